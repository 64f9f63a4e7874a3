"""tools/import_model.py: each published checkpoint shape built from the tiny models, imported, and checked
weight for weight; bad inputs refused in one line with nothing written."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import launch

from tools import import_model as im  # noqa: E402


@pytest.fixture(scope="module")
def base(assets):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(assets["sd"], safety_checker=None)
    return {"dir": assets["sd"], "unet": pipe.unet.state_dict(), "text": pipe.text_encoder.state_dict(),
            "config": dict(pipe.unet.config)}


def _perturbed(state: dict, seed: int, keep=lambda k: True) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous() if v.is_floating_point() else v.clone()
            for k, v in state.items() if keep(k)}


def _import(base, ckpt, out, *extra):
    args = im.parse_args(["--pretrained_model_name_or_path", base["dir"], "--checkpoint", str(ckpt),
                          "--output_dir", str(out), *extra])
    return im.main(args)


def _component(out, name):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cls = UNet2DConditionModel if name == "unet" else CLIPTextModel
    return cls.from_pretrained(str(out), subfolder=name).state_dict()


def _equal(a: dict, b: dict, keys=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys or b))


def to_ldm(unet_state: dict, config: dict) -> dict:
    """A diffusers UNet state dict under the original CompVis/LDM names (the inverse of diffusers' conversion),
    for an SD-1.x-style UNet: the test builds the file the original ESD code ships."""
    layers = config["layers_per_block"]
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    prefixes = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
                "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."}
    for b in range(len(config["down_block_types"])):
        for j in range(layers):
            i = 1 + b * (layers + 1) + j
            prefixes[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{i}.0."
            prefixes[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{i}.1."
        prefixes[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{1 + b * (layers + 1) + layers}.0.op."
    for b, kind in enumerate(config["up_block_types"]):
        for j in range(layers + 1):
            i = b * (layers + 1) + j
            prefixes[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{i}.0."
            prefixes[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{i}.1."
        slot = 2 if "CrossAttn" in kind else 1
        prefixes[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{b * (layers + 1) + layers}.{slot}.conv."
    out = {}
    for key, value in unet_state.items():
        prefix = max((p for p in prefixes if key.startswith(p)), key=len)
        rest = key[len(prefix):]
        if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
            name, _, tail = rest.partition(".")
            rest = f"{resnet[name]}.{tail}"
        out["model.diffusion_model." + prefixes[prefix] + rest] = value
    return out


def test_full_diffusers_unet_imports_bit_for_bit_and_generates_as_a_hand_swap(base, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    weights = _perturbed(base["unet"], 1)
    ckpt = tmp_path / "uce-golf_ball.safetensors"
    save_file(weights, str(ckpt))
    out = tmp_path / "imported"
    # Through the command line, as a user runs it.
    proc = launch("tools/import_model.py", ["--pretrained_model_name_or_path", base["dir"], "--checkpoint", str(ckpt),
                                            "--output_dir", str(out)], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((out / "import_card.json").read_text())
    assert (card["format"], card["format_detected"], card["components_replaced"]) == ("diffusers-unet", True, ["unet"])
    assert card["tensors_from_file"] == len(weights) and len(card["sha256"]) == 64
    assert _equal(_component(out, "unet"), weights) and _equal(_component(out, "text_encoder"), base["text"])
    from common.models import check_pipeline_dir

    check_pipeline_dir(str(out))  # what the fine-tuning scripts, eval_model.py and unlearn.py check
    # Same images as the base pipeline with the same UNet weights swapped in by hand.
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="np")
    by_hand = StableDiffusionPipeline.from_pretrained(base["dir"], safety_checker=None)
    by_hand.unet.load_state_dict(weights)
    imported = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    a = by_hand("a red circle", generator=torch.Generator().manual_seed(3), **kw).images
    b = imported("a red circle", generator=torch.Generator().manual_seed(3), **kw).images
    assert (a == b).all()


def test_ldm_named_checkpoint_converts_back_bit_for_bit(base, tmp_path):
    weights = _perturbed(base["unet"], 2)
    ldm = to_ldm(weights, base["config"])
    assert len(ldm) == len(weights) and all(k.startswith("model.diffusion_model.") for k in ldm)
    ckpt = tmp_path / "esd.ckpt"
    torch.save({"state_dict": {**ldm, "first_stage_model.dummy": torch.zeros(1)}, "global_step": 1000}, ckpt)
    card = _import(base, ckpt, tmp_path / "out")
    assert card["format"] == "ldm" and card["tensors_from_file"] == len(weights)
    assert _equal(_component(tmp_path / "out", "unet"), weights)


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_partial_cross_attention_checkpoint_is_merged_over_the_base(base, tmp_path, layout):
    xattn = lambda k: "attn2.to_k" in k or "attn2.to_v" in k  # noqa: E731 - what ESD-x and UCE edit
    weights = _perturbed(base["unet"], 3, keep=xattn)
    assert 0 < len(weights) < len(base["unet"])
    ckpt = tmp_path / "esd-x.pt"
    if layout == "flat":  # UCE's and today's ESD code: {"<module>.weight": tensor}
        torch.save(weights, ckpt)
    else:  # ESD's first diffusers code: {"unet.<module>": {"weight": tensor}}
        torch.save({f"unet.{k.rsplit('.', 1)[0]}": {k.rsplit(".", 1)[1]: v} for k, v in weights.items()}, ckpt)
    card = _import(base, ckpt, tmp_path / "out")
    assert card["format"] == "partial" and card["tensors_from_file"] == len(weights)
    assert card["tensors_kept_from_base"] == len(base["unet"]) - len(weights)
    got = _component(tmp_path / "out", "unet")
    assert _equal(got, weights) and _equal(got, base["unet"], [k for k in base["unet"] if not xattn(k)])


def test_text_encoder_checkpoint_replaces_only_the_text_encoder(base, tmp_path):
    weights = _perturbed(base["text"], 4)
    ckpt = tmp_path / "advunlearn_text_encoder.bin"
    torch.save(weights, ckpt)
    card = _import(base, ckpt, tmp_path / "out")
    assert card["format"] == "text-encoder" and card["components_replaced"] == ["text_encoder"]
    assert _equal(_component(tmp_path / "out", "text_encoder"), weights)
    assert _equal(_component(tmp_path / "out", "unet"), base["unet"])


def test_lora_file_is_fused_at_its_scale(base, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base["dir"], subfolder="unet")
    rank, alpha = 4, 8
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    torch.manual_seed(5)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # peft starts B at 0: give the LoRA something to add
    lora = get_peft_model_state_dict(unet)
    # The adapter's config (alpha) travels in the file's metadata, as diffusers' training scripts save it.
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=lora,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    ckpt = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    card = _import(base, ckpt, tmp_path / "out", "--lora_scale", "0.5")
    assert card["format"] == "lora" and card["components_replaced"] == ["unet"] and card["lora_scale"] == 0.5
    got = _component(tmp_path / "out", "unet")
    # By hand: W + scale x (alpha / rank) x B @ A for every adapted projection; every other tensor as the base.
    adapted = 0
    for key, w in base["unet"].items():
        a_key = key.replace(".weight", ".lora_A.weight")
        a = lora.get(a_key)
        if a is None or not key.endswith(".weight"):
            assert torch.equal(got[key], w), key
            continue
        b = lora[key.replace(".weight", ".lora_B.weight")]
        torch.testing.assert_close(got[key], w + 0.5 * (alpha / rank) * b @ a, rtol=0, atol=1e-6)
        adapted += 1
    assert adapted == len(lora) // 2 > 0


class _NotWeights:
    """An object whose unpickling would run code the loader cannot vouch for."""


@pytest.mark.parametrize("case", ["pickle", "shape", "foreign", "no-base", "missing"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(base, tmp_path, capsys, case):
    from safetensors.torch import save_file

    ckpt, base_dir, extra = tmp_path / "ckpt.pt", base["dir"], []
    if case == "pickle":
        torch.save({"w": torch.zeros(1), "obj": _NotWeights()}, ckpt)
        message = "refused: not a weights-only torch file"
    elif case == "shape":  # a UNet of another architecture (twice the channels of one block)
        weights = dict(base["unet"])
        weights["conv_in.weight"] = torch.zeros(64, 4, 3, 3)
        ckpt = tmp_path / "ckpt.safetensors"
        save_file(weights, str(ckpt))
        message = "another shape than the base UNet"
    elif case == "foreign":  # a partial file with keys the UNet does not have
        weights = {k: v for k, v in base["unet"].items() if "attn2.to_k" in k}
        weights["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_kv.weight"] = torch.zeros(2, 2)
        torch.save(weights, ckpt)
        extra = ["--format", "partial"]
        message = "1 key(s) match nothing in the base UNet: down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_kv"
    elif case == "missing":  # declared full, but a tensor is absent
        torch.save({k: v for k, v in base["unet"].items() if k != "conv_out.bias"}, ckpt)
        extra = ["--format", "diffusers-unet"]
        message = "1 key(s) of the base UNet are missing: conv_out.bias"
    else:
        torch.save(base["unet"], ckpt)
        base_dir = str(tmp_path / "no_such_base")
        message = "no such directory"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        im.main(im.parse_args(["--pretrained_model_name_or_path", base_dir, "--checkpoint", str(ckpt),
                               "--output_dir", str(out), *extra]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("import_model.py: error:"), err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp")]
