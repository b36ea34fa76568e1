"""Third-party messages the harness decides not to show.

Each is silenced narrowly (its logger or warning category, and the start of its text), only where
nothing the harness controls avoids it, with the reason beside it. harness/__init__.py imports
this module, so every process of the harness installs the filters before those libraries load.
"""

import logging
import warnings


class _Drop(logging.Filter):
    """Drops the records of one logger whose message starts with `start`."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


LOGGED = {
    # bitsandbytes 0.50, on a CPU with AVX512-BF16, tries at import to fetch a 4-bit kernel from
    # the Hugging Face hub; offline the fetch fails, and its own CPU code runs nf4 instead.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    # LLM.int8 casts each layer's input to float16, which is the method, and says so on every
    # call: thousands of lines per int8 cell.
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
    # transformers 5's T5 always declares its lm_head tied (T5Config forces tie_word_embeddings),
    # then finds flan-t5's own lm_head in the checkpoint and keeps it untied, as the harness wants.
    "transformers.modeling_utils": "The tied weights mapping and config for this model",
    # transformers and peft import DeepSpeed, where it is installed, to ask whether ZeRO-3 is on;
    # on a machine without a GPU it says at import that it found none, which the harness knows.
    "DeepSpeed": "Setting accelerator to CPU",
}
for name, start in LOGGED.items():
    logging.getLogger(name).addFilter(_Drop(start))

# peft 0.21 reads PreTrainedModel.is_gradient_checkpointing, which transformers 5.24 renamed to
# is_activation_checkpointing and warns about on every read.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)

# peft says, on merging LoRA into an int8 or 4-bit base, that rounding may change generations:
# the harness records exactly that in the run's tag infer_merged (harness/cell/infer.py).
warnings.filterwarnings("ignore", message="Merge lora module to (8|4)-bit linear may get",
                        category=UserWarning)
# peft 0.21, after a merge, finds the embeddings untied where the config says tied: T5Config in
# transformers 5 forces tie_word_embeddings, and flan-t5 has its own lm_head (see LOGGED).
warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied after "
                        "merging", category=UserWarning)
# DeepSpeed 0.19 calls torch.distributed's collectives under their old names, which torch 2.13
# warns about on every call: hundreds of lines per ZeRO cell.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|"
                        r"reduce_scatter_tensor)` is deprecated", category=FutureWarning)
