"""The paper's OLMoE-1B-7B ablation numbers (C3PO, arXiv 2504.07964), as digested.

Tables 3-6: NGD's 6-benchmark average accuracy (%) per setting; the other
settings at their best values (last token, kNN k = 3, Gaussian kernel,
10 steps, last 5 layers, top-20 core experts). Fig. 5: share of the top-8
after optimizing all 64 experts that lies in the base top-n. Fig. 6: ARC-C
accuracy after NGD steps and the share of correct answers that flip to wrong.
Where the paper shows a curve without printed values (Fig. 3's layer sets,
Fig. 4's FLOPs axis), only what the text states is kept: no number is read
off a plot.
"""

from __future__ import annotations

BASE_AVG = 69.9  # Table 1, base model, 6-benchmark average
NGD_AVG = 79.2  # Table 1, NGD (the best settings)

# Table 3: (position, tokens) -> average accuracy.
TOKENS = {('last', 1): 79.20, ('last', 3): 77.90, ('first', 1): 74.45, ('middle', 1): 71.40}
# Table 4.
NEIGHBOURHOOD = {
  'k=1': 75.28,
  'k=3': 79.20,
  'k=5': 77.70,
  'eps=0.3': 73.68,
  'eps=0.5': 77.12,
  'eps=0.7': 76.87,
}
# Table 5: NGD steps -> average accuracy.
STEPS = {3: 74.22, 5: 76.90, 10: 79.20, 20: 79.25, 50: 79.22}
# Table 6.
KERNELS = {'linear': 69.95, 'polynomial': 73.33, 'matern': 76.28, 'gaussian': 79.20}
# Fig. 3: the text's finding only: the last 5 layers are best (79.2, Table 1).
LAYERS = {'L5': 79.20}
# Fig. 4: the plateau: top-20 core experts match optimizing all 64 (79.2).
CORE = {20: 79.20}
CORE_PLATEAU = 20
# Fig. 5: n -> % of the final top-8 inside the base top-n (all experts optimized).
COVERAGE = {8: 71.3, 20: 99.8}
# Fig. 6, ARC-C: NGD step -> accuracy (step 0: base), and the flip rate.
TRAJECTORY = {0: 51.3, 6: 62.9, 10: 66.3}
FLIP_RATE = 5.1  # % of the base's correct answers wrong after NGD (ARC-C)
