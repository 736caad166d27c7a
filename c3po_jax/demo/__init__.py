"""The embedded demo: a synthetic multiple-choice suite and a small OLMoE trained on it.

suite.py (with families.py) generates the benchmark families, their reference
sources and splits; tokenizer.py builds the BPE tokenizer; train.py trains and
saves the checkpoint shipped in checkpoints/demo; scoring.py and evaluate.py
give its base accuracy; tune.py chooses the C3PO settings on dev.
"""
