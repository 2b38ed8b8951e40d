"""Shipped training recipes (TOML files); `dni-rnn recipes` lists them."""
