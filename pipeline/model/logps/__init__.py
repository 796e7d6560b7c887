"""Sequence log-probs: the primitives over a padded batch (`padded`), their chunked and packed twins
(`chunked`, `packed`), and the one dispatcher the scorer and the trainer both call (`dispatch`)."""
