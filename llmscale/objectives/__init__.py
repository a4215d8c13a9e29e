"""Training objectives beside next-token prediction: preference losses (DPO and its variants)
and masked-LM input corruption. Plain tensor functions; the training loop applies them."""
