"""Building blocks of `cfg_guidance.input_pipeline`: sources, decoding, the index stream."""
