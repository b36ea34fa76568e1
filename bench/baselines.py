"""What a user would otherwise write or pick, on the very same cell as the harness: a minimal
hand-written PyTorch loop, and Hugging Face's Seq2SeqTrainer.

    python bench/baselines.py {handwritten,trainer} CELL_YAML OUT_JSON

CELL_YAML is the harness's resolved cell config; both baselines build its model and data with
the harness's own loaders, so only the training loop differs. Each writes the end time of every
optimizer step (perf_counter seconds) and the samples per step to OUT_JSON.
"""

import json
import sys
import tempfile
import time

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, get_linear_schedule_with_warmup

from harness.data import synthetic
from harness.model import models


def handwritten(model, dataset, collate, cfg, device) -> list[float]:
    train_cfg = cfg.train
    loader = DataLoader(dataset, batch_size=train_cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(train_cfg.seed),
                        collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr,
                                  weight_decay=train_cfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, train_cfg.warmup_steps,
                                               train_cfg.max_steps)
    model.train()
    step_ends = []
    while len(step_ends) < train_cfg.max_steps:
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_ends.append(time.perf_counter())
            if len(step_ends) == train_cfg.max_steps:
                break
    return step_ends


def trainer(model, dataset, collate, cfg, device) -> list[float]:
    # Imported here, so that the hand-written loop's process does not carry the Trainer's imports.
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())

    train_cfg = cfg.train
    step_ends = StepEnds()
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = Seq2SeqTrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=train_cfg.batch_size,
            max_steps=train_cfg.max_steps, learning_rate=train_cfg.lr,
            weight_decay=train_cfg.weight_decay, warmup_steps=train_cfg.warmup_steps,
            lr_scheduler_type="linear", max_grad_norm=train_cfg.max_grad_norm,
            optim="adamw_torch", seed=train_cfg.seed, logging_steps=1, report_to="none",
            save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
            use_cpu=device.type == "cpu", disable_tqdm=True)
        Seq2SeqTrainer(model=model, args=arguments, train_dataset=dataset, data_collator=collate,
                       callbacks=[step_ends]).train()
    return step_ends.times


def main(kind: str, cell_yaml: str, out_json: str) -> None:
    cfg = OmegaConf.load(cell_yaml)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, cfg.precision.name, False, device)
    dataset = synthetic.synthetic(cfg.data, vocab_size=len(tokenizer))["train"]
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    step_ends = {"handwritten": handwritten, "trainer": trainer}[kind](
        model, dataset, collate, cfg, device)
    with open(out_json, "w") as file:
        json.dump({"step_ends_s": step_ends, "samples_per_step": cfg.train.batch_size}, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
