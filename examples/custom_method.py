"""A distillation method defined outside the package, used by name with layer-wise learning rates.
The teacher trains alone for two epochs (method="none"), then is distilled into the student."""

import lightning.pytorch as pl
import torch.nn.functional as F

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from lightning_layerkd.data import DigitsDataModule
from lightning_layerkd.methods import DistillationMethod, MethodOutput, register_method
from lightning_layerkd.models import resnet


@register_method("cosine_energy")
class CosineEnergy(DistillationMethod):  # per layer: 1 - cos of the energy maps mean_c F_c^2
    divergence_name = "cosine"  # logged as train/cosine/<layer>

    def compute(self, nets, x, y, *, create_graph):  # the teacher is frozen: it builds no graph
        with nets.student_hooks.record() as s_rec, nets.teacher_hooks.record() as t_rec:
            logits, t_logits = nets.student(x), nets.teacher(x)
            s_feats, t_feats = nets.student_hooks.outputs(s_rec), nets.teacher_hooks.outputs(t_rec)
        div = {}  # channel means fit any widths; pooling matches the resolutions
        for name, s, t in zip(nets.layer_names, s_feats, t_feats, strict=True):
            s = F.adaptive_avg_pool2d(s.pow(2).mean(1, keepdim=True), t.shape[-2:]).flatten(1)
            div[name] = 1 - F.cosine_similarity(s, t.pow(2).mean(1).flatten(1), dim=1)  # (B,)
        return MethodOutput(logits, t_logits, div, {"map_loss": sum(div.values()).mean()})


def main() -> None:
    data = DigitsDataModule(batch_size=32, subset=40, seed=pl.seed_everything(0))  # 400 images
    teacher, student = (resnet(d, 10, w, data.in_channels) for d, w in ((18, 8), (10, 4)))
    kw = dict(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False)
    pl.Trainer(**kw).fit(DistillationModule(None, teacher, method="none", num_classes=10), data)
    module = DistillationModule(teacher, student, method="cosine_energy", num_classes=10)
    pl.Trainer(callbacks=[LayerwiseLRCallback(every_n_epochs=1)], **kw).fit(module, data)
    print("learning rates:", {g["name"]: g["lr"] for g in module.optimizers().param_groups})


if __name__ == "__main__":
    main()
