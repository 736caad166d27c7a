"""The paper's ablation study (Tables 3-6, Figs. 3-6) in one command: `python -m c3po_jax.ablate`.

layer_sets: Fig. 3's layer-set names for any depth. paper: the paper's OLMoE
numbers. flops: analytic FLOPs per test sample (Fig. 4). studies: the grids.
context: one benchmark's shared state and one setting's run. store: results
per setting, keyed by content (resumable). analysis: coverage, flips, tables.
figures: the plots. study: the driver.
"""
