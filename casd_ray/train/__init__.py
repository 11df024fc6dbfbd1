"""How to train any ``nn.Module``: the loop, distillation, BN recalibration, devices.

Rule: ``train/`` never imports ``models/``, ``widths/``, ``artifacts/`` or ``search/``. A
loop takes any network, so the teacher, every search trial and every fine-tune train with
the same code.
"""
