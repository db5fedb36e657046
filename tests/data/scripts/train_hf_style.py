"""A Hugging Face-style model (its own gradient_checkpointing_enable, as transformers' PreTrainedModel defines it:
checkpoint with use_reentrant=True unless told otherwise), trained as an ordinary CUDA script."""
import argparse
import functools

import torch
import torch.utils.checkpoint


class Layer(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class TinyPreTrained(torch.nn.Module):
    supports_gradient_checkpointing = True

    def __init__(self, width=256, depth=4):
        super().__init__()
        self.embed = torch.nn.Linear(32, width)
        self.layers = torch.nn.ModuleList(Layer(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 10)
        self.gradient_checkpointing = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        kwargs = {"use_reentrant": True} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        self._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, **kwargs)
        self.gradient_checkpointing = True

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x)
            else:
                x = layer(x)
        return self.head(x.mean(1))


parser = argparse.ArgumentParser()
parser.add_argument("--ckpt", default="off", choices=["off", "reentrant", "non-reentrant"])
args = parser.parse_args()
model = TinyPreTrained().cuda()
if args.ckpt == "reentrant":
    model.gradient_checkpointing_enable()
elif args.ckpt == "non-reentrant":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
optimizer = torch.optim.AdamW(model.parameters())
for _ in range(2):
    x = torch.randn(16, 128, 32, device="cuda")
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,), device="cuda"))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
