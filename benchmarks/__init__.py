"""gradfuse's benchmark suite: every gradfuse backend against ``torch.nn.utils`` clipping.

Run ``python -m benchmarks`` (``--help`` for the options); see benchmarks/README.md.
"""
