"""A real client: Hugging Face ``transformers.Trainer`` drives OSFN (around torch's AdamW)
with its own cosine schedule and gradient clipping, checkpoints it, and resumes from its own
checkpoint with the optimizer state restored. (Extra ``hf``; the dev install includes it.)"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from osfn_dist import OSFN  # noqa: E402

VOCAB, SEQ = 48, 16


class Copies(torch.utils.data.Dataset):
    """Sequences that repeat a random prefix: learnable in a few steps by a tiny GPT-2."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        half = torch.randint(0, VOCAB, (n, SEQ // 2), generator=g)
        self.ids = torch.cat([half, half], dim=1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(out_dir, max_steps):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    opt = OSFN(base=torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01), subspace_dim=4,
               newton_warmup=2)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=8, lr_scheduler_type="cosine",
        warmup_steps=2, max_grad_norm=1.0, save_strategy="steps", save_steps=6, logging_steps=3, report_to=[],
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Copies(), optimizers=(opt, None))
    return trainer, model, opt


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_trainer_trains_checkpoints_and_resumes_with_the_optimizer_state(tmp_path):
    trainer, model, opt = _trainer(tmp_path / "a", max_steps=12)
    result = trainer.train()
    assert opt.diagnostics["step"] == 12 and opt.diagnostics["subspace_step_norm"] > 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert result.training_loss > 0

    resumed, model_b, opt_b = _trainer(tmp_path / "a", max_steps=12)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert opt_b.diagnostics["step"] == 12  # 6 restored + 6 new: the OSFN state came back
    assert torch.allclose(_flat(model_b), _flat(model), atol=1e-6, rtol=0)
