"""`scorer_options`: the keyword arguments of `pipeline.model.scoring.SequenceScorer` for a config.

Apart from the scorer so that the driver that starts scoring actors builds their arguments without
importing torch; the actors import the scorer itself.
"""

from __future__ import annotations

from pipeline.config import Config


def scorer_options(config: Config, *, use_gpu: bool, gpus: float = 1.0) -> dict:
    """SequenceScorer's keyword arguments for `config`: the score section's switches, the model's dtype;
    `gpus` is what the actor holds, and more than one spreads the model over them."""
    score = config.score
    return dict(
        dtype=config.model.dtype,
        use_gpu=use_gpu,
        spread=use_gpu and gpus > 1,
        micro_batch=score.batch_size,
        trust_remote_code=config.model.trust_remote_code,
        attn_implementation=config.model.attn_implementation,
        packing=score.packing,
        chunk_size=score.logps_chunk_size if score.chunked_logps else None,
        compile=score.compile,
    )
