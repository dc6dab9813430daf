"""The advanced route: training data whose masks cover the background, and a LoRA fine-tuned on it.

``masks`` and ``dataset`` need numpy and Pillow only (``trt-bgswap dataset`` runs with the base
install); ``data``, ``finetune``, ``checkpoint`` and ``lora_file`` need the export extra (torch,
diffusers, peft) and are imported only by ``trt-bgswap finetune``.
"""
