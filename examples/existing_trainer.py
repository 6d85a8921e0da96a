"""Add layer-wise learning rates to an existing Lightning Trainer (Kokane et al. 2024).

Run: python examples/existing_trainer.py   (scikit-learn's digits; about a minute on a CPU)
"""

import functools

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from lightning_layerkd.data import DigitsDataModule
from lightning_layerkd.models import resnet

pl.seed_everything(0)
data = DigitsDataModule(image_size=16, batch_size=64)
teacher = resnet(18, num_classes=10, width=8)  # in practice: your trained teacher
student = resnet(10, num_classes=10, width=4)

module = DistillationModule(
    teacher,
    student,
    method="jacobian",  # or "attention", "hessian"
    num_classes=10,
    optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    scheduler=functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[4, 6]),
)
trainer = pl.Trainer(
    max_epochs=8,
    callbacks=[LayerwiseLRCallback(every_n_epochs=2, gamma=0.9)],
    logger=WandbLogger(project="lightning-layerkd", offline=True),
)
trainer.fit(module, datamodule=data)
print("crucial layers:", module.layer_pairs)
print("learning rates:", {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})
