"""The public C3PO code's routing override on transformers' PyTorch OLMoE.

The reference the JAX pathway is tested against (tests/test_pathway.py) and
the naive PyTorch NGD baseline of benchmarks/ngd_speed.py.
"""

from __future__ import annotations


def c3po_moe(torch, block, state: dict, key):
  """transformers' OLMoE MoE block with the public C3PO last-position override.

  Wraps one OlmoeSparseMoeBlock instance: router softmax in float32, the last
  position's row replaced by state[key] (read at every call, so a caller can
  update it between forwards; zeros set to 1e-10) over its sum, top-k on the
  replaced row, renormalized only if norm_topk_prob, then the block's own
  experts.
  """

  class C3poMoe(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.block = block

    def forward(self, hidden_states):
      b, t, d = hidden_states.shape
      gate = self.block.gate
      flat = hidden_states.reshape(-1, d)
      logits = torch.nn.functional.linear(flat, gate.weight)
      probs = torch.softmax(logits, dim=-1, dtype=torch.float).reshape(b, t, -1).clone()
      w = state[key].float()
      w = torch.where(w > 0, w, torch.full_like(w, 1e-10))
      probs[:, -1, :] = w / w.sum(dim=-1, keepdim=True)
      top_w, top_i = torch.topk(probs, gate.top_k, dim=-1)
      if gate.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
      top_w = top_w.to(logits.dtype)
      out = self.block.experts(flat, top_i.reshape(b * t, -1), top_w.reshape(b * t, -1))
      return out.reshape(b, t, d)

  return C3poMoe()
