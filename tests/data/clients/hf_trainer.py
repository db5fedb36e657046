"""Hugging Face's Trainer fine-tuning ViTForImageClassification (random weights, from a config: no hub) on a tiny
synthetic set, as its documentation writes it: one epoch, evaluation each epoch, a checkpoint each epoch.

    python hf_trainer.py [--batch-size 2] [--precision bf16|fp16|fp32] [--grad-ckpt] [--optim adamw_torch_fused]
"""
import argparse
import os
import tempfile

import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int, default=2)
p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
p.add_argument("--grad-ckpt", action="store_true")
p.add_argument("--optim", default="adamw_torch_fused")
p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "hf_trainer_out"))
a = p.parse_args()


class Synthetic(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"pixel_values": torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(i)), "labels": i % 5}


model = ViTForImageClassification(ViTConfig(num_labels=5))
args = TrainingArguments(output_dir=a.out, per_device_train_batch_size=a.batch_size,
                         per_device_eval_batch_size=a.batch_size, num_train_epochs=1, bf16=a.precision == "bf16",
                         fp16=a.precision == "fp16", gradient_checkpointing=a.grad_ckpt, optim=a.optim,
                         eval_strategy="epoch", save_strategy="epoch", report_to=[], logging_steps=1,
                         dataloader_num_workers=0, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=Synthetic(), eval_dataset=Synthetic())
trainer.train()
print("eval", trainer.evaluate())
print("peak allocated", torch.cuda.max_memory_allocated())
