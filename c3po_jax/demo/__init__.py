"""The embedded demo: a synthetic multiple-choice suite and a small OLMoE trained on it.

suite.py generates the benchmark families of a world (remix_world.py, the default:
the skill lives in the experts the router picks; families.py, the earlier
world kept as a negative control), their reference sources and splits;
bpe.py builds the BPE tokenizer; train.py trains and saves the
checkpoints shipped in checkpoints/demo and checkpoints/demo_control;
choice_scores.py and evaluate.py give base accuracy; premise.py measures whether a
model's routing carries what C3PO's neighbours can fix; tune.py chooses the
C3PO settings on dev.
"""
