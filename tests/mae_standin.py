"""A stand-in for an untouched facebookresearch/mae checkout, written for our tests (no MAE code copied).

It has MAE's file names and the functions, classes and signatures that MAE's scripts import from each
other, with small working bodies: enough to prove that our files drop into such a tree without overwriting
anything, that MAE's modules still import and work next to ours, and that MAE's own pre-training loop and
fine-tuning loader handle our model and checkpoints. MAE's `util/` has no `__init__.py` (a namespace
package), and neither does this one.
"""
import os
import textwrap

FILES = {
    "util/pos_embed.py": '''
        import numpy as np
        import torch


        def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
            omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
            out = np.einsum("m,d->md", pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)


        def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
            emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
            emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
            return np.concatenate([emb_h, emb_w], axis=1)


        def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
            coords = np.arange(grid_size, dtype=np.float32)
            grid = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, 1, grid_size, grid_size)
            emb = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
            return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0) if cls_token else emb


        def interpolate_pos_embed(model, checkpoint_model):
            """Resize checkpoint_model['pos_embed'] to the model's grid (extra tokens kept as they are)."""
            if "pos_embed" not in checkpoint_model:
                return
            old = checkpoint_model["pos_embed"]
            num_patches = model.patch_embed.num_patches
            num_extra = model.pos_embed.shape[-2] - num_patches
            old_size, new_size = int((old.shape[-2] - num_extra) ** 0.5), int(num_patches ** 0.5)
            if old_size == new_size:
                return
            extra, grid = old[:, :num_extra], old[:, num_extra:]
            grid = grid.reshape(-1, old_size, old_size, old.shape[-1]).permute(0, 3, 1, 2)
            grid = torch.nn.functional.interpolate(grid, size=(new_size, new_size), mode="bicubic",
                                                   align_corners=False)
            checkpoint_model["pos_embed"] = torch.cat([extra, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    ''',
    "util/misc.py": """
        import math

        import torch


        def get_rank():
            return 0


        def get_world_size():
            return 1


        def is_main_process():
            return True


        def get_grad_norm_(parameters, norm_type=2.0):
            grads = [p.grad for p in parameters if p.grad is not None]
            if not grads:
                return torch.tensor(0.0)
            return torch.norm(torch.stack([torch.norm(g.detach(), norm_type) for g in grads]), norm_type)


        class NativeScalerWithGradNormCount:
            state_dict_key = "amp_scaler"

            def __init__(self):
                self._scaler = torch.amp.GradScaler("cuda", enabled=torch.cuda.is_available())

            def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False,
                         update_grad=True):
                self._scaler.scale(loss).backward(create_graph=create_graph)
                norm = None
                if update_grad:
                    self._scaler.unscale_(optimizer)
                    parameters = list(parameters)
                    if clip_grad is not None:
                        norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
                    else:
                        norm = get_grad_norm_(parameters)
                    self._scaler.step(optimizer)
                    self._scaler.update()
                return norm

            def state_dict(self):
                return self._scaler.state_dict()


        def save_model(args, epoch, model, model_without_ddp, optimizer, loss_scaler):
            torch.save({"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                        "epoch": epoch, "scaler": loss_scaler.state_dict(), "args": vars(args)},
                       f"{args.output_dir}/checkpoint-{epoch}.pth")


        def all_reduce_mean(x):
            return x
    """,
    "util/lr_sched.py": """
        import math


        def adjust_learning_rate(optimizer, epoch, args):
            if epoch < args.warmup_epochs:
                lr = args.lr * epoch / args.warmup_epochs
            else:
                progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
                lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            return lr
    """,
    "util/lr_decay.py": """
        def get_layer_id_for_vit(name, num_layers):
            if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
                return 0
            if name.startswith("blocks"):
                return int(name.split(".")[1]) + 1
            return num_layers


        def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=[], layer_decay=.75):
            num_layers = len(model.blocks) + 1
            groups = {}
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                no_decay = p.ndim == 1 or name in no_weight_decay_list
                layer = get_layer_id_for_vit(name, num_layers)
                key = (layer, no_decay)
                groups.setdefault(key, {"lr_scale": layer_decay ** (num_layers - layer),
                                        "weight_decay": 0.0 if no_decay else weight_decay, "params": []})
                groups[key]["params"].append(p)
            return list(groups.values())
    """,
    "util/lars.py": """
        import torch


        class LARS(torch.optim.Optimizer):
            def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
                super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                              trust_coefficient=trust_coefficient))
    """,
    "util/crop.py": """
        from torchvision import transforms


        class RandomResizedCrop(transforms.RandomResizedCrop):
            pass
    """,
    "util/datasets.py": """
        from torchvision import datasets, transforms


        def build_transform(is_train, args):
            return transforms.Compose([transforms.Resize(args.input_size), transforms.ToTensor()])


        def build_dataset(is_train, args):
            root = f"{args.data_path}/{'train' if is_train else 'val'}"
            return datasets.ImageFolder(root, transform=build_transform(is_train, args))
    """,
    "models_mae.py": """
        import torch.nn as nn

        from util.pos_embed import get_2d_sincos_pos_embed


        class MaskedAutoencoderViT(nn.Module):
            def __init__(self, embed_dim=64, grid_size=2, norm_pix_loss=False):
                super().__init__()
                self.table = get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True)


        def mae_vit_base_patch16(**kwargs):
            return MaskedAutoencoderViT(**kwargs)
    """,
    "models_vit.py": '''
        import timm.models.vision_transformer
        import torch
        import torch.nn as nn


        class VisionTransformer(timm.models.vision_transformer.VisionTransformer):
            """MAE's fine-tuning ViT: global pooling puts fc_norm after the mean and drops the final norm."""

            def __init__(self, global_pool=False, **kwargs):
                super().__init__(**kwargs)
                self.global_pool = global_pool
                if global_pool:
                    self.fc_norm = nn.LayerNorm(kwargs["embed_dim"], eps=1e-6)
                    del self.norm

            def forward_features(self, x):
                x = self.patch_embed(x)
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
                for blk in self.blocks:
                    x = blk(x)
                return self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else self.norm(x)[:, 0]

            def forward(self, x):
                return self.head(self.forward_features(x))


        def vit_base_patch16(**kwargs):
            return VisionTransformer(patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs)
    ''',
    "engine_pretrain.py": """
        import math

        import torch

        import util.lr_sched as lr_sched
        import util.misc as misc


        def train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, log_writer=None,
                            args=None):
            model.train(True)
            accum_iter = args.accum_iter
            optimizer.zero_grad()
            losses = []
            for data_iter_step, (samples, _) in enumerate(data_loader):
                if data_iter_step % accum_iter == 0:
                    lr_sched.adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)
                samples = samples.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise SystemExit(f"Loss is {loss_value}, stopping training")
                loss /= accum_iter
                loss_scaler(loss, optimizer, parameters=model.parameters(),
                            update_grad=(data_iter_step + 1) % accum_iter == 0)
                if (data_iter_step + 1) % accum_iter == 0:
                    optimizer.zero_grad()
                losses.append(loss_value)
            return {"loss": sum(losses) / len(losses)}
    """,
    "engine_finetune.py": """
        import torch

        import util.misc as misc


        def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler, max_norm=0,
                            mixup_fn=None, log_writer=None, args=None):
            raise NotImplementedError("stand-in: only imported")


        @torch.no_grad()
        def evaluate(data_loader, model, device):
            model.eval()
            hits = total = 0
            for images, target in data_loader:
                hits += (model(images.to(device)).argmax(-1) == target.to(device)).sum().item()
                total += len(target)
            return {"acc1": 100.0 * hits / max(total, 1)}
    """,
    "main_pretrain.py": """
        import argparse

        import models_mae
        import util.misc as misc
        from engine_pretrain import train_one_epoch
        from util.misc import NativeScalerWithGradNormCount as NativeScaler


        def get_args_parser():
            parser = argparse.ArgumentParser("MAE pre-training", add_help=False)
            parser.add_argument("--model", default="mae_vit_large_patch16")
            parser.add_argument("--mask_ratio", default=0.75, type=float)
            parser.add_argument("--norm_pix_loss", action="store_true")
            return parser
    """,
    "main_finetune.py": '''
        import argparse

        import torch

        import models_vit
        import util.lr_decay as lrd
        import util.misc as misc
        from engine_finetune import evaluate, train_one_epoch
        from util.datasets import build_dataset
        from util.misc import NativeScalerWithGradNormCount as NativeScaler
        from util.pos_embed import interpolate_pos_embed


        def load_finetune_checkpoint(model, path, global_pool):
            """What MAE's main() does with --finetune: the head is dropped if its shape differs, the position
            embedding interpolated, the rest loaded non-strictly, and only the new head may be missing."""
            checkpoint_model = torch.load(path, map_location="cpu")["model"]
            state_dict = model.state_dict()
            for k in ["head.weight", "head.bias"]:
                if k in checkpoint_model and checkpoint_model[k].shape != state_dict[k].shape:
                    del checkpoint_model[k]
            interpolate_pos_embed(model, checkpoint_model)
            msg = model.load_state_dict(checkpoint_model, strict=False)
            if global_pool:
                assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
            else:
                assert set(msg.missing_keys) == {"head.weight", "head.bias"}
            torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
            return msg
    ''',
    "main_linprobe.py": """
        import models_vit
        import util.misc as misc
        from engine_finetune import evaluate, train_one_epoch
        from util.crop import RandomResizedCrop
        from util.lars import LARS
        from util.pos_embed import interpolate_pos_embed
    """,
    "submitit_pretrain.py": "import main_pretrain as trainer\n",
    "submitit_finetune.py": "import main_finetune as trainer\n",
    "submitit_linprobe.py": "import main_linprobe as trainer\n",
    "README.md": "## Masked Autoencoders: a stand-in tree for tests\n",
    "LICENSE": "stand-in\n",
}


def write_mae_tree(root: str) -> None:
    for rel, text in FILES.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text).lstrip("\n"))
