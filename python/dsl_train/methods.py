"""How the embedding tables are trained: dense baseline or one of the sparse methods.

==================  ==========================================================================
``dense``           stock ``nn.Embedding`` / ``nn.EmbeddingBag`` (the baseline; density 1.0)
``dsl``             Dynamic Sparse Learning: sparse at the budget from step 0, the mask moves by
                    prune (magnitude) / regrow (gradient) every ``update_every`` steps
                    (``dsl_kernels.sparsity.DSLScheduler``, ``schedule="from_scratch"``)
``static``          sparse at the budget with a random mask that never changes
``magnitude``       dense training for the first ``dense_fraction`` of the epochs, one-shot prune
                    to the budget by block magnitude (``SparseEmbeddingBag.from_dense``), then
                    sparse fine-tuning with a fresh optimizer
``dense_to_sparse`` start dense (a sparse pool at density 1.0), shrink to the target density on a
                    cubic schedule, then keep adapting the mask (arXiv 2010.08655)
==================  ==========================================================================

:class:`Controller` owns the optimizer (and the scheduler) and is driven by the loop:
``loss.backward(); ctl.step()`` and ``ctl.end_epoch(epoch)``.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from dsl_kernels import BlockSparseBase, SparseEmbedding, SparseEmbeddingBagCollection, TableConfig
from dsl_kernels.sparsity import allocate_by_frequency_

from .models import DenseEmbeddingBagCollection, SparseTables

METHODS = ("dense", "dense_small", "dsl", "static", "magnitude", "dense_to_sparse")
MASK_INITS = ("frequency", "aligned", "random")


@dataclass
class MethodConfig:
    """Everything that decides how the tables are stored and trained."""

    method: str = "dense"
    density: float = 1.0
    block_size: int = 8
    init_std: float = 0.1
    backend: str = "auto"
    # Initial mask of sparse tables: "frequency" (blocks per row ~ count ** frequency_power, in
    # the first columns; needs the rows' training counts, else falls back to "aligned"),
    # "aligned" (random per-row counts, first columns) or "random" (random columns).
    mask_init: str = "frequency"
    frequency_power: float = 0.5
    frequency_min_blocks: int = 1    # blocks every row that occurs gets first (budget allowing)
    dim: Optional[int] = None        # dense_small: the table's (reduced) dimension
    reset_optimizer: bool = True     # DSL: zero the optimizer state of reassigned slots
    keep_rows: bool = True           # DSL: never prune a row's last block
    # DSL / dense_to_sparse
    update_every: int = 100          # steps between mask updates (Delta T)
    prune_fraction: float = 0.3      # alpha_0, the share of active blocks moved at the 1st update
    stop_fraction: float = 0.75      # mask updates stop after this share of the steps (T_end)
    grow: str = "gradient"
    score_window: int = 10           # batches of gradient accumulated for the growth score
    distribution: str = "global"
    adapt_every: Optional[int] = None  # dense_to_sparse: mask updates after reaching the target
    # magnitude
    dense_fraction: float = 0.5      # share of epochs trained dense before the one-shot prune
    # stale-embedding skipping
    skip_stale: bool = False
    target_skip: float = 0.3

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"--density must be in (0, 1], got {self.density}")
        if self.method in ("dense", "dense_small") and self.density != 1.0:
            raise ValueError(f"--method {self.method} trains a dense table: use --density 1.0 "
                             "(dense_small takes --memory), or pick a sparse method (dsl, "
                             "static, magnitude, dense_to_sparse)")
        if self.mask_init not in MASK_INITS:
            raise ValueError(f"--mask-init must be one of {', '.join(MASK_INITS)}, got "
                             f"{self.mask_init!r}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dense_small dim must be >= 1, got {self.dim}")
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if not 0.0 < self.stop_fraction <= 1.0:
            raise ValueError(f"--stop-fraction must be in (0, 1], got {self.stop_fraction}")
        if not 0.0 < self.dense_fraction < 1.0:
            raise ValueError(f"--dense-fraction must be in (0, 1), got {self.dense_fraction}")

    @property
    def sparse(self) -> bool:
        return self.method not in ("dense", "dense_small")

    def to_dict(self) -> dict:
        return asdict(self)


# Named method recipes of the quality sweep (``dsl-train sweep --methods``): the method plus
# the MethodConfig fields that make it what the literature calls it. ``dsl`` is this project's
# recipe (the MethodConfig defaults the CLI gives); ``dsl_paper`` is DSL's published one
# (element-wise blocks, uniform random mask, optimizer state kept for grown weights,
# single-batch gradient growth, cosine update fraction from 0.5, its ΔT of 3000 iterations,
# updates over the whole run).
PRESETS: Dict[str, Dict[str, object]] = {
    "dense": {"method": "dense"},
    "dense_small": {"method": "dense_small"},
    "static": {"method": "static", "mask_init": "random"},
    "static_aligned": {"method": "static", "mask_init": "aligned"},
    "static_frequency": {"method": "static", "mask_init": "frequency"},
    "magnitude": {"method": "magnitude"},
    "dense_to_sparse": {"method": "dense_to_sparse"},
    "dsl_paper": {"method": "dsl", "block_size": 1, "mask_init": "random",
                  "reset_optimizer": False, "keep_rows": False, "score_window": 1,
                  "prune_fraction": 0.5,
                  "update_every": 3000, "stop_fraction": 1.0},
    "dsl": {"method": "dsl"},
}


def preset(name: str, base: MethodConfig) -> MethodConfig:
    """``base`` with the fields of the named recipe (:data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(PRESETS)}")
    d = base.to_dict()
    d.update(PRESETS[name])
    if d["method"] in ("dense", "dense_small"):
        d["density"] = 1.0
    return MethodConfig(**d)


def _normal(std: float) -> Callable[[torch.Tensor], None]:
    return lambda v: nn.init.normal_(v, std=std)


def resolve_memory(cfg: MethodConfig, tcfg, num_rows: int) -> MethodConfig:
    """Apply ``tcfg.memory`` (a share of the full dense table's bytes, optimizer state included)
    to the method: a density for the sparse methods, a dimension for ``dense_small``. Without a
    memory target the config is returned as is (``dense_small`` then needs ``cfg.dim``)."""
    from .protocol import density_for_memory, dim_for_memory

    share = getattr(tcfg, "memory", None)
    if share is None:
        if cfg.method == "dense_small" and cfg.dim is None:
            raise ValueError("--method dense_small needs --memory (a share of the dense "
                             "table's bytes) to size its dimension")
        return cfg
    d = cfg.to_dict()
    if cfg.method == "dense":
        raise ValueError("--memory sizes the compressed methods; --method dense is the full "
                         "table (drop --memory)")
    if cfg.method == "dense_small":
        d["dim"] = dim_for_memory(share, tcfg.dim)
    else:
        d["density"] = density_for_memory(share, num_rows, tcfg.dim, cfg.block_size,
                                          tcfg.optimizer)
    return MethodConfig(**d)


def make_table(cfg: MethodConfig, num_rows: int, dim: int, device=None,
               row_counts: Optional[torch.Tensor] = None) -> nn.Module:
    """The single table of MF / LightGCN (``num_rows x dim``) for the method's first phase.
    ``row_counts`` (training occurrences of every row) feeds ``mask_init="frequency"``."""
    if cfg.method == "dense_small":
        dim = cfg.dim if cfg.dim is not None else dim
    elif dim % cfg.block_size:
        raise ValueError(f"--dim {dim} must be a multiple of --block-size {cfg.block_size}")
    if cfg.method in ("dense", "dense_small", "magnitude"):
        emb = nn.Embedding(num_rows, dim, device=device)
        nn.init.normal_(emb.weight, std=cfg.init_std)
        return emb
    density = 1.0 if cfg.method == "dense_to_sparse" else cfg.density
    emb = SparseEmbedding(num_rows, dim, density=density, block_size=cfg.block_size,
                          init=_normal(cfg.init_std), backend=cfg.backend, device=device,
                          mask_init="random" if cfg.mask_init == "random" else "aligned")
    _init_mask(emb, cfg, row_counts)
    return emb


def _init_mask(pool: BlockSparseBase, cfg: MethodConfig,
               row_counts: Optional[torch.Tensor]) -> None:
    """The modules start random or aligned (even per-row counts, first columns); "frequency"
    re-lays the aligned mask by the rows' training counts (aligned when there are none)."""
    if cfg.method != "dense_to_sparse" and cfg.mask_init == "frequency" and row_counts is not None:
        allocate_by_frequency_(pool, row_counts, cfg.frequency_power, cfg.frequency_min_blocks)


def make_collection(cfg: MethodConfig, sizes: Sequence[int], names: Sequence[str], dim: int,
                    device=None) -> nn.Module:
    """The per-feature tables of DLRM (``[B, F] -> [B, F, D]``) for the method's first phase."""
    if dim % cfg.block_size:
        raise ValueError(f"--dim {dim} must be a multiple of --block-size {cfg.block_size}")
    if cfg.method in ("dense", "magnitude"):
        return DenseEmbeddingBagCollection(sizes, dim, init_std=cfg.init_std, device=device)
    density = 1.0 if cfg.method == "dense_to_sparse" else cfg.density
    ebc = SparseEmbeddingBagCollection([TableConfig(n, s, dim, "sum") for n, s in zip(names, sizes)],
                                       density=density, block_size=cfg.block_size,
                                       init=_normal(cfg.init_std), backend=cfg.backend,
                                       device=device, output="concat",
                                       mask_init="random" if cfg.mask_init == "random"
                                       else "aligned")
    _init_mask(ebc, cfg, None)  # no per-row counts for CTR tables: frequency -> aligned
    return SparseTables(ebc, list(names), dim)


def sparse_pools(model: nn.Module) -> List[BlockSparseBase]:
    """The block-sparse pools inside ``model`` (what the scheduler drives)."""
    return [m for m in model.modules() if isinstance(m, BlockSparseBase)]


@torch.no_grad()
def prune_to_sparse(module: nn.Module, cfg: MethodConfig) -> nn.Module:
    """One-shot magnitude pruning of a dense table (or collection) to the budget, keeping the
    blocks with the largest L2 norm; for a collection the ranking is global across tables."""
    if isinstance(module, nn.Embedding):
        return SparseEmbedding.from_dense(module.weight, cfg.density, block_size=cfg.block_size,
                                          backend=cfg.backend)
    if isinstance(module, DenseEmbeddingBagCollection):
        names = [f"C{j + 1}" for j in range(len(module.bags))]
        sizes = [b.num_embeddings for b in module.bags]
        dev = module.bags[0].weight.device
        ebc = SparseEmbeddingBagCollection([TableConfig(n, s, module.dim, "sum")
                                            for n, s in zip(names, sizes)], density=cfg.density,
                                           block_size=cfg.block_size, backend=cfg.backend,
                                           device=dev, output="concat")
        B, NB = cfg.block_size, ebc.num_blocks
        keys, vals = [], []
        for t, bag in zip(ebc.tables, module.bags):
            blocks = bag.weight.reshape(-1, B)  # [N_t * NB_t, B]
            r = torch.arange(blocks.shape[0], device=dev) // t.num_blocks
            c = torch.arange(blocks.shape[0], device=dev) % t.num_blocks
            keys.append((r + t.row_start) * NB + c)
            vals.append(blocks)
        keys_all, vals_all = torch.cat(keys), torch.cat(vals)
        order = torch.sort(vals_all.norm(dim=1), descending=True, stable=True).indices
        keep = order[: ebc.budget]
        keep = keep[torch.argsort(keys_all[keep])]
        ebc.coord.copy_(keys_all[keep])
        ebc.values.copy_(vals_all[keep])
        ebc.rebuild_index()
        return SparseTables(ebc, names, module.dim)
    raise TypeError(f"cannot prune a {type(module).__name__}")


def _engine():
    try:
        from dsl_kernels.sparsity import DSLScheduler
    except ImportError as e:  # the engine is issue 6; say so instead of a bare ImportError
        raise RuntimeError("methods 'dsl' and 'dense_to_sparse' need dsl_kernels.sparsity."
                           f"DSLScheduler, which could not be imported here ({e})") from e
    return DSLScheduler


def engine_available() -> bool:
    try:
        _engine()
        return True
    except RuntimeError:
        return False


class Controller:
    """Optimizer + sparsity schedule of one run.

    ``make_optimizer(model) -> torch.optim.Optimizer`` is called at the start (and again after the
    magnitude prune, since the parameters change). ``total_steps`` sizes the DSL schedule;
    ``stop_step`` (default ``stop_fraction * total_steps``) is ``T_end``.
    """

    def __init__(self, cfg: MethodConfig, model: nn.Module,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 total_steps: int, epochs: int, stop_step: Optional[int] = None):
        self.cfg, self.model, self.make_optimizer = cfg, model, make_optimizer
        self.optimizer = make_optimizer(model)
        self.scheduler = None
        self.total_steps = max(1, total_steps)
        self.stop_step = stop_step if stop_step is not None else max(
            1, int(cfg.stop_fraction * self.total_steps))
        if cfg.method == "magnitude" and epochs < 2:
            raise ValueError("--method magnitude trains dense, prunes, then fine-tunes: it needs "
                             "--epochs >= 2")
        self.prune_epoch = min(epochs - 1, max(1, int(round(cfg.dense_fraction * epochs))))
        self.pruned = False
        if cfg.method in ("dsl", "dense_to_sparse") or (cfg.skip_stale and cfg.sparse
                                                        and cfg.method != "magnitude"):
            self.scheduler = self._make_scheduler()

    def _make_scheduler(self):
        DSLScheduler = _engine()
        cfg = self.cfg
        pools = sparse_pools(self.model)
        kw = dict(update_every=cfg.update_every, prune_fraction=cfg.prune_fraction,
                  stop_at=self.stop_step, grow=cfg.grow, score_window=cfg.score_window,
                  distribution=cfg.distribution)
        if cfg.method == "static":  # stale skipping only: a mask that never moves
            kw.update(prune_fraction=0.0)
        if not cfg.reset_optimizer:
            kw.update(reset_optimizer=False)
        kw.update(keep_rows=bool(cfg.keep_rows))  # explicit: the library default is True now
        if cfg.method == "dense_to_sparse":
            kw.update(schedule="dense_to_sparse", t_start=0, t_end=self.stop_step,
                      target_density=cfg.density)
            if cfg.adapt_every:
                kw.update(adapt_every=cfg.adapt_every)
        if cfg.skip_stale:
            kw.update(skip_stale=True, target_skip=cfg.target_skip)
        accepted = inspect.signature(DSLScheduler).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            unknown = sorted(set(kw) - set(accepted))
            if unknown:
                raise RuntimeError(f"DSLScheduler does not accept {unknown}; the trainer expects "
                                   f"the API of dsl_kernels.sparsity (issue 6)")
        return DSLScheduler(pools if len(pools) > 1 else pools[0], self.optimizer, **kw)

    def at_budget(self) -> bool:
        """Is the model at its final memory now? (Not during magnitude's dense phase nor
        during dense_to_sparse's decay: the selection protocol only picks such epochs.)"""
        if self.cfg.method == "magnitude":
            return self.pruned
        if self.cfg.method == "dense_to_sparse" and self.scheduler is not None:
            return self.scheduler.step_count >= self.stop_step
        return True

    def step(self) -> None:
        """After ``loss.backward()``: optimizer step, then the mask schedule."""
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def end_epoch(self, epoch: int) -> Optional[str]:
        """Called after epoch ``epoch`` (0-based); returns a note when something changed."""
        if self.cfg.method == "magnitude" and not self.pruned and epoch + 1 == self.prune_epoch:
            for name, mod in self.model.embedding_modules().items():
                self.model.replace_embedding(name, prune_to_sparse(mod, self.cfg))
            self.optimizer = self.make_optimizer(self.model)
            self.pruned = True
            if self.cfg.skip_stale:
                self.scheduler = self._make_scheduler()
            return f"magnitude: pruned to density {self.cfg.density} after epoch {epoch + 1}"
        return None

    def stats(self) -> Dict[str, float]:
        """Current density of the sparse pools and the scheduler's counters."""
        out: Dict[str, float] = {}
        pools = sparse_pools(self.model)
        if pools:
            act = sum(p.num_active_blocks for p in pools)
            tot = sum(sum(t.num_rows * t.num_blocks for t in p.tables) for p in pools)
            out["density"] = act / tot
        else:
            out["density"] = 1.0
        if self.scheduler is not None and hasattr(self.scheduler, "stats"):
            for k, v in self.scheduler.stats().items():
                if isinstance(v, (int, float)):
                    out[k] = v
        return out


def backends_in_use(model: nn.Module) -> List[str]:
    return sorted({p.backend_for() for p in sparse_pools(model)})


__all__ = ["METHODS", "MethodConfig", "Controller", "make_table", "make_collection",
           "prune_to_sparse", "sparse_pools", "engine_available"]
