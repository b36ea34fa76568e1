"""Token-id facts every layer shares, torch-free: the special ids random weights and synthetic
data use, the label the loss skips, and which tokenizer a model config gets (its identity and
where it is loaded from), known without loading it.
"""




IGNORED_LABEL = -100  # what the loss skips: label padding, and a causal model's prompt
# T5's special ids: padding and end of sequence (synthetic data draws from the ids above them).
PAD_ID, EOS_ID = 0, 1


def tokenizer_identity(model_cfg) -> str:
    """Which tokenizer models.load_tokenizer gives for this model config, without loading it:
    `byte`, or where the model's own comes from."""
    choice = model_cfg.tokenizer
    if choice == "byte" or (choice == "auto" and model_cfg.source == "random"):
        return "byte"
    return f"{tokenizer_location(model_cfg)}@{model_cfg.revision}"


def tokenizer_location(model_cfg) -> str:
    # Random weights have no files of their own: their tokenizer=hub is model.hub_id's.
    return model_cfg.hub_id if model_cfg.source in ("hub", "random") else model_cfg.source
