"""The frozen configuration of one C3PO run (built once from flags by main)."""

from __future__ import annotations

import dataclasses

from c3po_jax import distributed, flag_checks, pathway

METHODS = ('base', 'icl', 'mode_finding', 'kernel_regression', 'ngd', 'oracle')
NGD_BACKENDS = ('prefix', 'naive')
NGD_INITS = ('base', 'kernel_mean')


@dataclasses.dataclass(frozen=True)
class RunConfig:
  checkpoint_dir: str
  benchmark: str
  reference: tuple[str, ...]
  methods: tuple[str, ...] = METHODS
  output_dir: str = 'runs/c3po'
  split: str | None = None
  source: str = 'auto'
  reference_split: str | None = None
  max_test_samples: int | None = None
  max_reference_samples: int | None = None
  resume: bool = False
  fmt: str = 'mc'
  # Neighbourhood and kernel.
  k: int = 3
  epsilon: float | None = None
  max_similarity: float = 0.95
  kernel: str = 'gaussian'
  sigma: str = 'reference'  # 'reference', 'median' or a float (kernels.py)
  ball_cap: int = 64  # most neighbours of an epsilon-ball (a static bound)
  embedder: str = 'moe'
  embedder_pooling: str = 'auto'  # HF encoder: auto (its config), mean, cls, last
  embedder_prefix: str = ''  # HF encoder: instruction prepended to every text
  # Efficient pathway.
  # 'last:N', one layer index 'I', or 'I,J,K' (pathway.parse_layers).
  critical_layers: str = 'last:5'
  core_experts: int = 20
  # Which context token is re-mixed (the paper's Table 3): 'last' (default),
  # 'first', 'middle'.
  token_position: str = 'last'
  # What NGD optimizes: the core weights ('weights', projected onto the
  # simplex of the core mass) or their log-softmax logits ('logits').
  pathway_param: str = 'weights'
  # Where NGD starts: 'base' (the test sample's routing, the paper's) or
  # 'kernel_mean' (the kernel-weighted mean of the neighbours' routing).
  ngd_init: str = 'base'
  # Surrogates.
  ngd_steps: int = 10
  lr: float = 1e-2
  lr_end: float = 1e-5
  optimizer: str = 'adam'
  loss: str = 'choice_ce'
  opt_pathway_mode: str = 'dense'
  eval_pathway_mode: str = 'topk'
  kr_alpha: float | None = None
  mode_alpha: float = 0.5
  mode_iters: int = 10
  mode_neighbours: int = 10
  # Neighbour loss: 'prefix' recomputes only what the pathway changes; 'naive'
  # re-runs every neighbour's full forward at each step (reference).
  ngd_backend: str = 'prefix'
  prefix_cache_size: int = 1024  # references whose prefix states are kept (LRU; 0: off)
  # Execution.
  batch_size: int = 8
  dtype: str | None = None
  max_len: int = 2048
  cache_dir: str = '~/.cache/c3po_jax'
  num_plots: int = 4
  # Scale-out (c3po_jax/distributed.py).
  mesh_shape: str | None = None  # per-process mesh, e.g. 'data:4,expert:2'; default all on data
  multihost: bool = False  # jax.distributed.initialize (arguments auto-detected on TPU VMs)
  coordinator_address: str | None = None  # host:port of process 0, off TPU VMs
  num_processes: int | None = None
  process_id: int | None = None
  # Replace the results already in output_dir (only the files a run writes).
  overwrite: bool = False

  def __post_init__(self):
    unknown = set(self.methods) - set(METHODS)
    if unknown:
      raise ValueError(f'unknown methods {sorted(unknown)}; choose from {METHODS}')
    if not self.methods:
      raise ValueError('no methods selected')
    if self.fmt not in ('mc', 'rc'):
      raise ValueError(f"fmt must be 'mc' or 'rc', got {self.fmt!r}")
    needs_refs = set(self.methods) - {'base', 'oracle'}
    if needs_refs and not self.reference:
      raise ValueError(f'methods {sorted(needs_refs)} need --reference sources')
    if self.batch_size < 1 or self.k < 1:
      raise ValueError('batch_size and k must be >= 1')
    if self.ngd_backend not in NGD_BACKENDS:
      raise ValueError(f'ngd_backend={self.ngd_backend!r}, expected one of {NGD_BACKENDS}')
    if self.prefix_cache_size < 0:
      raise ValueError(f'prefix_cache_size={self.prefix_cache_size} must be >= 0')
    distributed.parse_mesh_shape(self.mesh_shape)  # raises on a malformed spec
    flag_checks.check_ranges(self)  # --lr=0, --dtype=int8, ...: refused before any model loads
    if self.token_position not in ('last', 'first', 'middle'):
      raise ValueError(f'token_position must be last, first or middle, got {self.token_position!r}')
    if self.pathway_param not in pathway.PATHWAY_PARAMS:
      raise ValueError(
        f'pathway_param must be one of {pathway.PATHWAY_PARAMS}, got {self.pathway_param!r}'
      )
    if self.ngd_init not in NGD_INITS:
      raise ValueError(f'ngd_init must be one of {NGD_INITS}, got {self.ngd_init!r}')
    if isinstance(self.critical_layers, int):
      pathway.parse_layers(self.critical_layers, 1)  # raises: say last:N or the index
    if not isinstance(self.critical_layers, str):  # explicit indices -> their spec string
      object.__setattr__(
        self, 'critical_layers', ','.join(str(int(i)) for i in self.critical_layers)
      )
