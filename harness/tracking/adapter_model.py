"""A run's LoRA adapter as an MLflow model (pyfunc) that summarises dialogues (or, for a model
trained on instructions, answers prompts):

    summarizer = mlflow.pyfunc.load_model(f"models:/{model_id}")
    summarizer.predict(["Anna: Are we meeting at 5?\nBen: Yes, at the station."])

The model holds the adapter's weights only (peft's own files, artifacts["adapter"]) and the
cell's model config. Loading rebuilds the base model as the cell did (the hub's or a folder's
weights, or the same random weights from their seed), applies the adapter and generates greedily.
MLflow's transformers flavour cannot carry a seq2seq model under transformers 5, which has no
text2text pipeline, so the runner logs this file as the model's code (nothing is pickled), with
the harness package beside it.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class Summarizer(PythonModel):
    """Dialogues in, summaries out, through the base model and the run's adapter."""

    def load_context(self, context) -> None:
        import torch  # here: MLflow imports this file to log it, which needs none of them
        from omegaconf import OmegaConf

        # isort: off
        from harness.model import families, models  # first: the harness's filters before peft
        from peft import PeftModel
        # isort: on

        config = OmegaConf.create(context.model_config)
        self.tokenizer = models.load_tokenizer(config.model)
        base = models.load_model(config.model, "fp32", True, torch.device("cpu"))
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).eval()
        self.prefix, self.max_new_tokens = config.prefix, config.max_new_tokens
        self.family = families.of(config.model)
        self.tokenizer.padding_side = "left"  # a causal model continues where its prompt ends

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        import torch

        batch = self.tokenizer([self.prefix + text for text in model_input], padding=True,
                               truncation=True, return_tensors="pt")
        with torch.no_grad():
            output = self.model.generate(**batch, max_new_tokens=self.max_new_tokens,
                                         num_beams=1, do_sample=False)
        new = self.family.new_tokens(output, batch["input_ids"])
        return [text.strip() for text in
                self.tokenizer.batch_decode(new, skip_special_tokens=True)]


mlflow.models.set_model(Summarizer())
