"""Evaluation: loss on a split, and ROUGE of deterministic generations on the test split."""

import re

import torch
from tqdm.auto import tqdm

from harness.model import families
from harness.model.models import autocast
from harness.model.tokenizers import IGNORED_LABEL

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@torch.no_grad()
def loss(model, loader, precision, device: torch.device) -> float:
    """Mean cross-entropy per target token over the whole split (its exp: the perplexity)."""
    model.eval()
    total, count = 0.0, 0
    for batch in tqdm(loader, desc="eval loss", unit="batch"):
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast(device, precision):
            batch_loss = model(**batch).loss
        tokens = int((batch["labels"] != IGNORED_LABEL).sum())
        total += batch_loss.float().item() * tokens
        count += tokens
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, loader, eval_cfg, precision, device: torch.device,
             family=families.FAMILIES["seq2seq"]) -> list:
    """Greedy (num_beams=1) or beam-search summaries or responses, the new tokens decoded to
    text, in loader order."""
    model.eval()
    predictions = []
    for batch in tqdm(loader, desc="generating", unit="batch"):
        with autocast(device, precision):
            output = model.generate(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device),
                                    num_beams=eval_cfg.num_beams, do_sample=False,
                                    max_new_tokens=eval_cfg.max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)
        new = family.new_tokens(output, batch["input_ids"])
        predictions += tokenizer.batch_decode(new, skip_special_tokens=True)
    return [prediction.strip() for prediction in predictions]


def rouge(predictions: list, references: list, unit: str = "words") -> dict:
    """ROUGE-1/2/L/Lsum F1 x 100, averaged over examples, with Porter stemming.

    rougeLsum splits summaries on newlines (no sentence splitter: nltk's punkt data is not
    assumed to be installed); SAMSum summaries are mostly one or two sentences on one line.
    unit=characters scores every character but spaces as a token (data.rouge_unit): for
    Japanese, which has no spaces between words and which rouge-score's own tokenizer, ASCII
    only, would drop entirely.
    """
    # Imported here: rouge-score pulls in nltk (~60 MiB), which a cell's training need not hold.
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=unit == "words",
                                      tokenizer=Characters() if unit == "characters" else None)
    scores = [scorer.score(reference, prediction)
              for reference, prediction in zip(references, predictions)]
    return {key: 100 * sum(score[key].fmeasure for score in scores) / max(len(scores), 1)
            for key in ROUGE_KEYS}


class Characters:
    """rouge-score's tokenizer interface: every character but whitespace is a token."""

    def tokenize(self, text: str) -> list:
        return re.findall(r"\S", text.lower())
