"""The guards' torch side: one hook per guard (`align`, `ptr`, `oh`), the guarded attention
function they all pass through, and the guarded decoder that runs them inside a family's layers.
"""
