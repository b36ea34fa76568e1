"""Model families: what differs between an encoder-decoder model (seq2seq: T5, mT5) and a
decoder-only one (causal: GPT-NeoX, BLOOM), in one object per family, so that loading, data,
training, evaluation and the estimate never branch on the family themselves.

A family knows which transformers class builds its models and which peft task type wraps them,
how one example becomes token ids (seq2seq: the source into the encoder, the target as labels;
causal: prompt and response as one sequence, the prompt's labels masked unless
data.train_on_inputs), how examples are padded into a batch, and which tokens of a generation are
new (a causal model returns its prompt first).
"""

from dataclasses import dataclass

import numpy as np
import torch
from peft import TaskType
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
)

# IGNORED_LABEL: what the loss skips (label padding, causal prompts)
from harness.model.tokenizers import IGNORED_LABEL


class Seq2Seq:
    name = "seq2seq"
    task_type = TaskType.SEQ_2_SEQ_LM
    auto_class = AutoModelForSeq2SeqLM

    def encode(self, tokenizer, sources: list, targets: list, lengths: dict, pad: bool,
               train_on_inputs: bool) -> dict:
        """input_ids / attention_mask of the sources, labels of the targets, each cut (the
        tokenizer keeps the end-of-sequence token) and padded to its cut when `pad`."""
        padding = "max_length" if pad else False
        encoded = tokenizer(sources, max_length=lengths["source"], truncation=True,
                            padding=padding)
        labels = tokenizer(text_target=targets, max_length=lengths["target"], truncation=True,
                           padding=padding)["input_ids"]
        # Padded labels would be learnt as tokens: the loss skips IGNORED_LABEL instead.
        encoded["labels"] = [[IGNORED_LABEL if token == tokenizer.pad_token_id else token
                              for token in label] for label in labels] if pad else labels
        return dict(encoded)

    def assemble(self, source: list, target: list, lengths: dict, pad: bool, pad_id: int,
                 train_on_inputs: bool) -> dict:
        """One example from token ids that already end with end-of-sequence and fit their cuts."""
        def padded(ids, length, value):
            return ids + [value] * (length - len(ids)) if pad else ids
        input_ids = padded(source, lengths["source"], pad_id)
        return {"input_ids": input_ids,
                "attention_mask": [int(token != pad_id) for token in input_ids],
                "labels": padded(target, lengths["target"], IGNORED_LABEL)}

    def collate(self, tokenizer):
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORED_LABEL)

    generation_collate = collate  # the encoder reads the source; labels are not used

    def new_tokens(self, output: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        return output  # the decoder's output is all new

    @staticmethod
    def padded_lengths(batch: dict) -> dict:
        """The lengths a training batch was padded to, as training_batch takes them."""
        return {"source": batch["input_ids"].shape[1], "target": batch["labels"].shape[1]}

    def training_batch(self, batch_size: int, lengths: dict, device, pad_id: int,
                       token_id: int) -> dict:
        """The batch the estimate steps on: every side at its cut, its last token padding."""
        ids = _full(batch_size, lengths["source"], token_id, pad_id, device)
        return {"input_ids": ids, "attention_mask": (ids != pad_id).long(),
                "labels": _full(batch_size, lengths["target"], token_id, IGNORED_LABEL, device)}


class Causal:
    name = "causal"
    task_type = TaskType.CAUSAL_LM
    auto_class = AutoModelForCausalLM

    def encode(self, tokenizer, sources: list, targets: list, lengths: dict, pad: bool,
               train_on_inputs: bool) -> dict:
        """Prompt then response then end-of-sequence as one sequence: the prompt cut at the
        source length, the whole at source + target length (alpaca-lora's cutoff_len)."""
        prompts = tokenizer(sources, add_special_tokens=False)["input_ids"]
        responses = tokenizer(targets, add_special_tokens=False)["input_ids"]
        examples = [self.assemble(prompt[:lengths["source"]],
                                  response + [tokenizer.eos_token_id], lengths, pad,
                                  tokenizer.pad_token_id, train_on_inputs)
                    for prompt, response in zip(prompts, responses)]
        return {key: [example[key] for example in examples] for key in examples[0]} \
            if examples else {}

    def assemble(self, source: list, target: list, lengths: dict, pad: bool, pad_id: int,
                 train_on_inputs: bool) -> dict:
        longest = lengths["source"] + lengths["target"]
        input_ids = (source + target)[:longest]
        labels = list(input_ids) if train_on_inputs else \
            ([IGNORED_LABEL] * len(source) + target)[:longest]
        mask = [1] * len(input_ids)
        if pad:
            missing = longest - len(input_ids)
            input_ids, labels, mask = (input_ids + [pad_id] * missing,
                                       labels + [IGNORED_LABEL] * missing, mask + [0] * missing)
        # The prompt's length: generation feeds the model the prompt alone.
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "prompt_length": len(source)}

    def collate(self, tokenizer):
        return CausalBatches(tokenizer.pad_token_id, prompts_only=False)

    def generation_collate(self, tokenizer):
        return CausalBatches(tokenizer.pad_token_id, prompts_only=True)

    def new_tokens(self, output: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        return output[:, prompt_ids.shape[1]:]  # generate returns the prompt first

    @staticmethod
    def padded_lengths(batch: dict) -> dict:
        """One sequence: its work depends on its whole length only, however prompt and response
        share it (the loss is computed at every position)."""
        return {"source": batch["input_ids"].shape[1] - 1, "target": 1}

    def training_batch(self, batch_size: int, lengths: dict, device, pad_id: int,
                       token_id: int) -> dict:
        longest = lengths["source"] + lengths["target"]
        ids = _full(batch_size, longest, token_id, pad_id, device)
        labels = ids.clone()
        labels[:, :lengths["source"]] = IGNORED_LABEL
        labels[:, -1] = IGNORED_LABEL
        return {"input_ids": ids, "attention_mask": (ids != pad_id).long(), "labels": labels}


@dataclass
class CausalBatches:
    """Pads causal examples into a batch: for training, on the right (labels with
    IGNORED_LABEL); for generation, the prompts alone on the left, so that every prompt ends
    where generation begins."""
    pad_id: int
    prompts_only: bool

    def __call__(self, examples: list) -> dict:
        if self.prompts_only:
            prompts = [example["input_ids"][:example["prompt_length"]] for example in examples]
            width = max(map(len, prompts))
            return {"input_ids": _padded(prompts, width, self.pad_id, left=True),
                    "attention_mask": _padded([[1] * len(ids) for ids in prompts], width, 0,
                                              left=True)}
        # Every key to the width of the longest input_ids (labels may be shorter).
        width = max(len(example["input_ids"]) for example in examples)
        return {key: _padded([example[key] for example in examples], width, value)
                for key, value in (("input_ids", self.pad_id), ("attention_mask", 0),
                                   ("labels", IGNORED_LABEL))}


def _padded(rows: list, width: int, value: int, left: bool = False) -> torch.Tensor:
    """The rows as one int64 tensor of `width` columns, each padded with `value` (on the left
    where asked). Filled row by row in numpy: torch.tensor of nested lists takes several times
    as long, and the training loop waits for each batch."""
    padded = np.full((len(rows), width), value, dtype=np.int64)
    for row, ids in zip(padded, rows):
        start = width - len(ids) if left else 0
        row[start:start + len(ids)] = ids
    return torch.from_numpy(padded)


def _full(batch_size: int, length: int, token_id: int, last: int, device) -> torch.Tensor:
    ids = torch.full((batch_size, length), token_id, dtype=torch.long, device=device)
    ids[:, -1] = last
    return ids


FAMILIES = {family.name: family for family in (Seq2Seq(), Causal())}


def of(model_cfg):
    """The family of a model config (model.family)."""
    return FAMILIES[model_cfg.family]
