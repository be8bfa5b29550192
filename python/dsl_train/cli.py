"""Placeholder until the trainer lands: runs the package demo."""


def main(argv=None) -> int:
    from dsl_kernels.__main__ import main as demo

    return demo(argv)
