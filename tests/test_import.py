"""`avatar-render import`: a small random checkpoint written in LiveTalk's layout, a Wan2.1 Diffusers directory and
wav2vec2 become one checkpoint directory that every entry point loads; broken pieces give one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from model_parts import UMT5_WIDTH, save_tiny_tokenizer, save_tiny_umt5, save_tiny_wav2vec2
from safetensors.torch import save_file

from model.checkpoint import MANIFEST_FILE, livetalk_key_hash, wan_to_livetalk
from model.dit import CausalWanDiT
from model.errors import ModelComponentError
from model.generator import AvatarModel
from model.importer import import_livetalk, load_wan_vae
from model.livetalk import dit_config
from model.vae import WanVAE

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
SIZE = 64  # video height and width of the test checkpoint


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """LiveTalk-layout DiT weights, a Wan2.1-T2V Diffusers directory and a wav2vec2 directory, all small and random."""
    root = tmp_path_factory.mktemp("sources")
    audio_width = save_tiny_wav2vec2(root / "wav2vec2")
    kwargs = {
        "dim": 128, "in_dim": 33, "ffn_dim": 256, "out_dim": 16, "text_dim": UMT5_WIDTH, "freq_dim": 32,
        "eps": 1e-6, "patch_size": (1, 2, 2), "num_heads": 1, "num_layers": 4, "has_image_input": False,
        "use_audio": True, "audio_hidden_size": 16, "audio_feature_dim": audio_width,
    }  # fmt: skip
    torch.manual_seed(0)
    dit = CausalWanDiT(dit_config(kwargs))
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if dit.is_conditioning_param(name):
                p.normal_(0.0, 0.02)
    (root / "livetalk").mkdir()
    save_file(wan_to_livetalk(dit.state_dict(), dit.cfg), root / "livetalk" / "model.safetensors")

    from diffusers import AutoencoderKLWan

    wan = root / "Wan2.1-T2V-1.3B-Diffusers"
    AutoencoderKLWan(base_dim=8, z_dim=16, latents_mean=[0.1] * 16, latents_std=[1.5] * 16).save_pretrained(wan / "vae")
    tokenizer = save_tiny_tokenizer(wan / "tokenizer")
    save_tiny_umt5(wan / "text_encoder", tokenizer.vocab_size)
    return {"dit": root / "livetalk" / "model.safetensors", "wan": wan, "wav2vec2": root / "wav2vec2"}


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints") / "livetalk-small"
    return import_livetalk(
        sources["dit"], sources["wan"], sources["wav2vec2"], out, height=SIZE, width=SIZE, log=lambda _: None
    )


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT, **kwargs)


def test_import_writes_one_self_contained_directory(imported, sources):
    names = {p.relative_to(imported).as_posix() for p in imported.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", MANIFEST_FILE} <= names
    assert any(n.startswith("text_encoder/") for n in names) and any(n.startswith("tokenizer/") for n in names)
    assert any(n.startswith("wav2vec2/") for n in names)
    manifest = json.loads((imported / MANIFEST_FILE).read_text())["files"]
    assert set(manifest) == names - {MANIFEST_FILE}
    assert all(len(f["sha256"]) == 64 and f["bytes"] == (imported / n).stat().st_size for n, f in manifest.items())
    config = json.loads((imported / "config.json").read_text())
    assert config["stage"] == "causal student" and config["preset"]["generator"]["sink"] == "first_frames"
    # The DiT inside is the source's, key for key, in our layout.
    from safetensors.torch import load_file

    from model.checkpoint import read_checkpoint

    preset, modules, _ = read_checkpoint(imported)
    dit = CausalWanDiT(preset.dit)
    dit.load_state_dict(modules["dit"])
    source = load_file(sources["dit"])
    assert livetalk_key_hash(wan_to_livetalk(dit.state_dict(), dit.cfg)) == livetalk_key_hash(source)
    assert all(torch.equal(v, source[k]) for k, v in wan_to_livetalk(dit.state_dict(), dit.cfg).items())


def test_render_one_renders_an_imported_checkpoint_end_to_end(imported, tmp_path):
    """Any audio length (not only LiveTalk's 3n+2 s): the last block is padded and the video trimmed to the audio."""
    from model.media import load_audio
    from model.media.video import probe

    out = tmp_path / "talk.mp4"
    done = cli("render-one", "--checkpoint", str(imported), "--portrait", str(EXAMPLES / "astronaut.jpg"),
               "--audio", str(EXAMPLES / "synth-0.wav"), "--out", str(out), "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = probe(out)
    seconds = len(load_audio(EXAMPLES / "synth-0.wav", 16000)) / 16000
    assert info["width"] == info["height"] == SIZE and info["fps"] == 16
    assert info["frames"] == int(np.ceil(seconds * 16)) and info["has_audio"]


def test_missing_or_corrupt_pieces_give_one_clear_error(imported, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(imported, broken)
    weights = broken / "wav2vec2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    done = cli("render-one", "--checkpoint", str(broken), "--portrait", str(EXAMPLES / "astronaut.jpg"),
               "--audio", str(EXAMPLES / "synth-0.wav"), "--out", str(tmp_path / "x.mp4"))  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(weights) in done.stderr and "re-import" in done.stderr
    shutil.rmtree(broken / "wav2vec2")
    (broken / MANIFEST_FILE).unlink()
    with pytest.raises(ModelComponentError, match="wav2vec2"):
        AvatarModel.load(broken)


def test_the_1_3b_preset_without_encoders_is_a_clear_error(tmp_path):
    done = cli("render-one", "--preset", "wan2.1-1.3b", "--portrait", str(EXAMPLES / "astronaut.jpg"),
               "--audio", str(EXAMPLES / "synth-0.wav"), "--out", str(tmp_path / "x.mp4"))  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "wav2vec2" in done.stderr and "avatar-render import" in done.stderr


def test_import_refuses_what_is_not_livetalk(sources, tmp_path):
    plain = tmp_path / "wan.safetensors"
    save_file({"patch_embedding.weight": torch.zeros(128, 16, 1, 2, 2)}, plain)
    done = cli("import", "livetalk", "--dit", str(plain), "--wan", str(sources["wan"]),
               "--wav2vec2", str(sources["wav2vec2"]), "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 2 and "not LiveTalk" in done.stderr and not (tmp_path / "out").exists()


def test_omniavatar_imports_as_the_bidirectional_teacher(sources, tmp_path):
    out = tmp_path / "teacher"
    size = ["--height", str(SIZE), "--width", str(SIZE)]
    done = cli("import", "omniavatar", "--dit", str(sources["dit"]), "--wan", str(sources["wan"]),
               "--wav2vec2", str(sources["wav2vec2"]), "--out", str(out), *size)  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "bidirectional teacher"
    assert config["preset"]["generator"]["sampler"] == "euler"


# -- Wan2.1's original VAE file ------------------------------------------------------------------------------------


def wan_original_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKLWan names -> Wan2.1_VAE.pth's, for the real block structure (written here from
    diffusers' own converter, which the importer uses the other way)."""
    resnet = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
              "conv2": "residual.6", "conv_shortcut": "shortcut"}  # fmt: skip

    def res(rest: str) -> str:
        for ours, theirs in resnet.items():
            if rest.startswith(ours):
                return theirs + rest[len(ours) :]
        return rest

    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            name = ("conv1." if key.startswith("quant_conv.") else "conv2.") + parts[-1]
        elif parts[1] in ("conv_in",):
            name = f"{parts[0]}.conv1.{parts[-1]}"
        elif parts[1] == "norm_out":
            name = f"{parts[0]}.head.0.gamma"
        elif parts[1] == "conv_out":
            name = f"{parts[0]}.head.2.{parts[-1]}"
        elif parts[1] == "mid_block":
            kind, index, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            name = (
                f"{parts[0]}.middle.1.{rest}" if kind == "attentions" else f"{parts[0]}.middle.{2 * index}.{res(rest)}"
            )
        elif parts[1] == "down_blocks":
            name = f"encoder.downsamples.{parts[2]}.{res('.'.join(parts[3:]))}"
        elif parts[1] == "up_blocks":
            block, rest = int(parts[2]), parts[3:]
            if rest[0] == "upsamplers":
                name = f"decoder.upsamples.{4 * block + 3}.{'.'.join(rest[2:])}"
            else:
                name = f"decoder.upsamples.{4 * block + int(rest[1])}.{res('.'.join(rest[2:]))}"
        else:
            name = key
        out[name] = value
    return out


def test_wan21_original_vae_imports_through_the_name_map(tmp_path):
    from model.config import get_preset

    preset = get_preset("livetalk-1.3b")
    small = preset.model_copy(update={"vae": preset.vae.model_copy(update={"base_dim": 8})})
    torch.manual_seed(0)
    reference = WanVAE(small.vae)
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save(wan_original_vae_keys(reference.model.state_dict()), pth)
    vae = load_wan_vae(small, None, pth)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(vae.model.state_dict()[key], value), key
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(video), reference.encode(video))


# -- checkpoints in object storage ----------------------------------------------------------------------------------


class CountingStore:
    """An ObjectStore that counts the files it downloads (one real S3 client underneath)."""

    def __init__(self, store):
        self.store, self.downloads, self.lock = store, 0, threading.Lock()

    def __getattr__(self, name):  # every other read goes to the real store
        return getattr(self.store, name)

    def get_file(self, uri, path):
        with self.lock:
            self.downloads += 1
        return self.store.get_file(uri, path)


def test_an_s3_checkpoint_is_downloaded_once_per_node_and_verified(imported, s3_server, tmp_path):
    from pipeline.model_cache import local_checkpoint
    from pipeline.storage import ObjectStore

    store = ObjectStore(s3_server)
    store._s3().create_bucket(Bucket="models")
    files = [p for p in imported.rglob("*") if p.is_file()]
    for path in files:
        store.put_file(f"s3://models/livetalk-small/{path.relative_to(imported).as_posix()}", path)
    counting = CountingStore(store)
    results = []

    def fetch():
        results.append(local_checkpoint("s3://models/livetalk-small", counting, tmp_path / "cache"))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and counting.downloads == len(files) - 1  # every listed file once (not the manifest)
    assert AvatarModel.load(results[0]).preset.name == AvatarModel.load(imported).preset.name

    store.put_bytes("s3://models/bad/MANIFEST.json", (imported / MANIFEST_FILE).read_bytes())
    for path in files:
        data = path.read_bytes() if path.name != "config.json" else b"{}"
        store.put_bytes(f"s3://models/bad/{path.relative_to(imported).as_posix()}", data)
    with pytest.raises(ModelComponentError, match="config.json: does not match"):
        local_checkpoint("s3://models/bad", store, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [Path(results[0]).name]


def test_a_job_renders_with_an_imported_checkpoint_from_s3(ray_cluster, s3_server, imported, tmp_path):
    """`run` / the service: settings name an s3:// checkpoint; the actor downloads it to its node's cache once and
    renders at the checkpoint's own size and rate."""
    from actors import job_workers
    from model.media.video import probe
    from pipeline.job import JobSpec, run_job
    from pipeline.settings import PipelineSettings
    from pipeline.storage import ObjectStore

    store = ObjectStore(s3_server)
    if "models" not in [b["Name"] for b in store._s3().list_buckets()["Buckets"]]:
        store._s3().create_bucket(Bucket="models")
    for path in (p for p in imported.rglob("*") if p.is_file()):
        store.put_file(f"s3://models/job-checkpoint/{path.relative_to(imported).as_posix()}", path)
    settings = PipelineSettings(storage=s3_server, checkpoint="s3://models/job-checkpoint",
                                model_cache_dir=str(tmp_path / "cache"), segment_blocks=2)  # fmt: skip
    row = {"id": "talk", "portrait": str(EXAMPLES / "synth-1.png"), "audio": str(EXAMPLES / "synth-1.wav")}
    report = run_job(JobSpec(job_id="imported", rows=[row], output=str(tmp_path / "out")), settings, job_workers())
    assert report.counts == {"succeeded": 1}, report.rows
    info = probe(tmp_path / "out" / "talk.mp4")
    assert info["width"] == SIZE and info["fps"] == 16
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_a_job_without_the_encoders_its_model_needs_fails_before_any_actor_starts(imported, tmp_path):
    import shutil

    from actors import job_workers
    from pipeline.job import JobSpec, run_job
    from pipeline.settings import PipelineSettings

    row = {"id": "talk", "portrait": str(EXAMPLES / "synth-1.png"), "audio": str(EXAMPLES / "synth-1.wav")}
    spec = JobSpec(job_id="no-encoders", rows=[row], output=str(tmp_path / "out"))
    with pytest.raises(ModelComponentError, match="wav2vec2"):
        run_job(spec, PipelineSettings(checkpoint=None, preset="wan2.1-1.3b"), job_workers())
    broken = tmp_path / "no-text"
    shutil.copytree(imported, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ModelComponentError, match="umT5"):
        run_job(spec, PipelineSettings(checkpoint=str(broken)), job_workers())
