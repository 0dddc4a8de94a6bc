"""Modelling code shipped inside every saved model whose layers have different widths.

`modeling_loraprune.py` must stay self-contained (only `torch` and `transformers`
imports): it is copied next to the weights and loaded by stock `transformers` with
`trust_remote_code=True` on machines without `loraprune`.
"""
