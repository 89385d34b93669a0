"""Other systems' MoE layers in our decoder, as peers to measure against (``model.moe.impl``).

``deepspeed``: DeepSpeed-MoE's ``deepspeed.moe.layer.MoE`` (fsmoe.models.peers.deepspeed_moe).
Each adapter swaps the decoder's MoE layers for the peer's layer around our own expert MLP, and
keeps the interface the trainer reads (``forward(x) -> (y, MoEStats)``, ``cfg``, ``router``,
``experts``), so tokens/s and MFU come out of the same ``fsmoe train`` step and metrics.
"""
