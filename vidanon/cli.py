"""Command line: ``vidanon run | recover | keys export | inspect | doctor | train-prior``.

Every user-caused problem surfaces as a ``VidanonError`` and is printed here as one line with
a non-zero exit; tracebacks are for bugs only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from vidanon.errors import VidanonError


class _Command(TyperCommand):
    """Plain help: ``INPUT`` rather than typer's ``{input}`` in the usage line, and no
    ``<bool>`` type column for flags (they take no value)."""

    def get_params(self, ctx):  # noqa: ANN001, ANN201
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False):
                p.display_type_rich = lambda ctx: None
        return params

    def parse_args(self, ctx, args):  # noqa: ANN001, ANN201
        # ``--ray`` takes an optional ADDRESS, which typer cannot declare: a bare --ray
        # (last, or followed by another option) means "auto".
        args = list(args)
        for i, a in enumerate(args):
            if a == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                args.insert(i + 1, "auto")
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx):  # noqa: ANN001, ANN201
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = (p.metavar or p.name or "").upper()
                pieces.append(name if p.required else f"[{name}]")
        return pieces


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Secure, reversible face anonymization in video.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage keyrings and track keys.")
app.add_typer(keys_app, name="keys")


def default_keyring() -> Path:
    """Per-user data dir, never next to outputs: output folders get published."""
    env = os.environ.get("VIDANON_KEYRING")
    if env:
        return Path(env)
    from platformdirs import user_data_dir

    return Path(user_data_dir("vidanon")) / "keyring.json"


def _passphrase(flag: bool, ring: Path | None = None) -> str | None:
    """The keyring passphrase: VIDANON_PASSPHRASE, else asked for (twice for a new keyring:
    a typo there would make every key in it unrecoverable)."""
    env = os.environ.get("VIDANON_PASSPHRASE")
    if env:
        return env
    if flag:
        new = ring is not None and not Path(ring).expanduser().exists()
        return typer.prompt("new keyring passphrase" if new else "keyring passphrase",
                            hide_input=True, confirmation_prompt=new)
    return None


def _key_passphrase(flag: bool, confirm: bool) -> str | None:
    """An exported key file's own passphrase (VIDANON_KEY_PASSPHRASE, or asked for)."""
    env = os.environ.get("VIDANON_KEY_PASSPHRASE")
    if env:
        return env
    if flag:
        return typer.prompt("key file passphrase", hide_input=True, confirmation_prompt=confirm)
    return None


def _fail(exc: BaseException) -> None:
    typer.echo(f"vidanon: error: {exc}", err=True)
    raise typer.Exit(2)


def _os_fail(exc: OSError) -> None:
    where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
    _fail(VidanonError(f"{exc.strerror or exc}{where}"))


@contextlib.contextmanager
def _signals_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP become SystemExit, so temporary files and pending keyring entries are
    cleaned up as on any other failure (only SIGKILL skips that; the next run cleans)."""

    def handler(signum, frame):  # noqa: ANN001, ANN202, ARG001
        raise SystemExit(128 + signum)

    old = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    except KeyboardInterrupt:
        typer.echo("vidanon: interrupted", err=True)
        raise typer.Exit(130) from None
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Model = Annotated[Optional[str], typer.Option(help="Model folder or hub id (default: bundled prior).")]  # noqa: UP045,E501
Passflag = Annotated[bool, typer.Option("--passphrase", help="Ask for a keyring passphrase.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]


@app.command(cls=_Command)
def run(
    input: Annotated[Path, typer.Argument(help="A video file or a folder of videos.",
                                          show_default=False)],
    output: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "-o", "--output", help="Output file (folder for a folder input).")] = None,
    keyring: Annotated[Optional[Path], typer.Option(help="Keyring file.")] = None,  # noqa: UP045
    config: Annotated[Optional[str], typer.Option(help="Preset name or YAML.")] = None,  # noqa: UP045
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="section.key=value")] = None,  # noqa: UP045
    model: Model = None,
    device: Device = "auto",
    link_identities: Annotated[bool, typer.Option(
        "--link-identities", help="Tracks of the same person share one pseudo-identity.")] = False,
    passphrase: Passflag = False,
    force: Force = False,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip the privacy guard (faster; no face is checked).")] = False,
    mask: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Region replaced: face (default), keep-eyes or keep-mouth.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--ray", metavar="[ADDRESS]", show_default=False,
        help="Render on a Ray cluster (head ADDRESS, e.g. 10.0.0.5:6379; bare --ray: the "
             "cluster this machine is in, else a local one). Put it after INPUT. See "
             "docs/scale.md.")] = None,
    workers: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="With --ray: number of workers (default: one per GPU, else per CPU).",
        show_default=False)] = None,
    segment_frames: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="With --ray: frames per work unit; longer videos are split (default 1800).",
        show_default=False)] = None,
    quiet: Quiet = False,
) -> None:
    """Anonymize every face; write OUTPUT, its sidecar, and the keys to the keyring."""
    from vidanon.batch import run_folder
    from vidanon.config import load_settings
    from vidanon.passes import pick_device
    from vidanon.pipeline import run as run_one
    from vidanon.publish import check_output, default_output

    try:
        with _signals_as_exit():
            if not input.exists():
                raise VidanonError(f"input {input} does not exist")
            overrides = (list(set_ or []) + (["guard.verify=false"] if no_verify else [])
                         + ([f"faces.mask={mask}"] if mask else []))
            settings = load_settings(config, overrides)
            if ray_address is None:
                if workers is not None or segment_frames is not None:
                    raise VidanonError("--workers and --segment-frames need --ray")
                pick_device(device)
            if not input.is_dir():
                check_output(input, output or default_output(input), force)
            ring = keyring or default_keyring()
            pw = _passphrase(passphrase, ring)
            if ray_address is not None:
                _run_on_ray(input, output, ring, settings, model, device, link_identities,
                            pw, force, quiet, ray_address, workers, segment_frames)
                return

            def one(inp: Path, out: Path | None):
                return run_one(inp, out, ring, settings, model, device, quiet, pw,
                               link_identities, overwrite=force)

            if input.is_dir():
                summary = run_folder(input, output, one, quiet, force=force)
                typer.echo(summary.line())
                typer.echo(f"keys added to keyring: {ring}")
                if summary.failed:
                    raise typer.Exit(1)
                return
            res = one(input, output)
            _report(res)
    except VidanonError as exc:
        _fail(exc)
    except OSError as exc:
        _os_fail(exc)


def _report(res) -> None:  # noqa: ANN001
    small = res.blurred - res.privacy.get("faces_blurred", 0)
    typer.echo(f"wrote {res.output} ({res.tracks} tracks, {res.faces} faces, "
               f"{small} blurred as too small)")
    typer.echo(f"sidecar: {res.sidecar}")
    typer.echo(privacy_line(res.privacy))
    if res.privacy.get("preset_warning"):
        typer.echo(res.privacy["preset_warning"], err=True)
    typer.echo(f"keys added to keyring: {res.keyring} (job {res.job_id})")


def _run_on_ray(input: Path, output: Path | None, ring: Path, settings: dict,
                model: str | None, device: str, link_identities: bool, pw: str | None,
                force: bool, quiet: bool, address: str, workers: int | None,
                segment_frames: int | None) -> None:
    """``run --ray``: the same per-file run, its rendering on the cluster (vidanon.scale)."""
    from vidanon import scale
    from vidanon.batch import find_videos, run_folder
    from vidanon.pipeline import run as run_one

    if workers is not None and workers < 1:
        raise VidanonError("--workers must be at least 1")
    seg = scale.DEFAULT_SEGMENT_FRAMES if segment_frames is None else segment_frames
    if seg < 1:
        raise VidanonError("--segment-frames must be at least 1")
    files = len(find_videos(input)) if input.is_dir() else 1
    if not files:
        raise VidanonError(f"no video files under {input}")
    scale.connect(address, quiet)
    pool = scale.WorkerPool(model or settings.get("model"), device, workers)
    progress = pool.progress = scale.Progress(files, quiet)
    workers_started = pool.size
    try:
        def one(inp: Path, out: Path | None):
            return run_one(inp, out, ring, settings, model, device, True, pw, link_identities,
                           overwrite=force, renderer=scale.RayRenderer(pool, seg))

        if input.is_dir():
            summary = run_folder(input, output, one, True, force=force,
                                 parallel=pool.size + 1, manifest=True, stop=pool.stop,
                                 on_file=lambda _inp, _what: progress.file_done())
        else:
            res = one(input, output)
            progress.file_done()
    finally:
        progress.close()
        pool.shutdown()
    s = pool.stats
    ray_line = (f"ray: {s['units']} units rendered on {workers_started} workers, {s['reused']} "
                f"reused from an earlier run, {s['resubmitted']} resubmitted")
    if not input.is_dir():
        _report(res)
        typer.echo(ray_line)
        return
    typer.echo(summary.line())
    typer.echo(ray_line)
    typer.echo(f"keys added to keyring: {ring}")
    if summary.failed:
        raise typer.Exit(1)


def privacy_line(p: dict) -> str:
    """The run's one-line privacy summary."""
    if not p.get("verified"):
        return "privacy: not verified (--no-verify)"
    return (f"privacy: {p['faces_checked']} faces checked, {p['faces_escalated']} escalated, "
            f"{p['faces_blurred']} blurred by the guard (closest to its original: similarity "
            f"{p['max_similarity']:.3f}, its threshold {p['threshold']:.3f})")


@app.command(cls=_Command)
def recover(
    video: Annotated[Path, typer.Argument(help="An anonymized video (its sidecar beside it).",
                                          show_default=False)],
    track: Annotated[str, typer.Option(help="Track id(s) to restore, e.g. 1 or 1,3.")],
    keyring: Annotated[Optional[Path], typer.Option()] = None,  # noqa: UP045
    key_file: Annotated[Optional[Path], typer.Option(help="An exported track key.")] = None,  # noqa: UP045
    output: Annotated[Optional[Path], typer.Option("-o", "--output")] = None,  # noqa: UP045
    model: Model = None,
    device: Device = "auto",
    passphrase: Passflag = False,
    key_passphrase: Annotated[bool, typer.Option(
        "--key-passphrase", help="Ask for the key file's passphrase.")] = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Restore the chosen tracks' faces; all other faces stay anonymized."""
    from vidanon.passes import pick_device
    from vidanon.pipeline import recover as recover_video

    try:
        with _signals_as_exit():
            if not video.exists():
                raise VidanonError(f"video {video} does not exist")
            if keyring is None and key_file is None:
                raise VidanonError("give --keyring KEYRING or --key-file TRACKKEY")
            try:
                ids = [int(t) for t in track.split(",") if t.strip()]
            except ValueError:
                raise VidanonError(f"--track must be ids like 1 or 1,3, not {track!r}") from None
            pick_device(device)
            out = recover_video(video, ids, output, keyring, key_file, model, device, quiet,
                                _passphrase(passphrase) if key_file is None else None,
                                # Earlier versions sealed keys with the keyring's.
                                key_passphrase=((_key_passphrase(key_passphrase, False)
                                                 or os.environ.get("VIDANON_PASSPHRASE") or None)
                                                if key_file is not None else None),
                                overwrite=force)
            typer.echo(f"wrote {out} (tracks {', '.join(map(str, ids))} restored)")
    except VidanonError as exc:
        _fail(exc)
    except OSError as exc:
        _os_fail(exc)


@keys_app.command("export", cls=_Command)
def keys_export(
    keyring: Annotated[Path, typer.Argument(show_default=False)],
    track: Annotated[int, typer.Option()],
    output: Annotated[Path, typer.Option("-o", "--output")],
    job: Annotated[Optional[str], typer.Option(help="Job id (default: the only/newest job).")] = None,  # noqa: UP045,E501
    sidecar_file: Annotated[Optional[Path], typer.Option("--sidecar", help="Take the job id from this sidecar.")] = None,  # noqa: UP045,E501
    passphrase: Passflag = False,
    key_passphrase: Annotated[bool, typer.Option(
        "--key-passphrase", help="Seal the exported key with its own passphrase (asked twice; "
        "or VIDANON_KEY_PASSPHRASE). Default: not sealed, mode 0600.")] = False,
    force: Force = False,
) -> None:
    """Write one track's key to a file for an authorised party (mode 0600)."""
    from vidanon import sidecar
    from vidanon.keys import Keyring, export_track_key

    try:
        if output.exists() and not force:
            raise VidanonError(f"{output} already exists; pass --force to replace it")
        ring = Keyring.open(keyring, passphrase=_passphrase(passphrase))
        listed = False
        if sidecar_file is not None:
            doc = sidecar.read(sidecar_file)
            job = doc["job_id"]
            # A linked track uses the key of the track it is linked to.
            track = int(sidecar.track_entry(doc, track).get("key_track", track))
            # The sidecar lists the job and track; it counts if the job's master signed it.
            sidecar.verify(doc, master=ring.master(job))
            listed = True
        if job is None:
            done = ring.complete_jobs()
            if not done:
                raise VidanonError("keyring holds no complete jobs" if ring.jobs
                                   else "keyring holds no jobs")
            job = max(done, key=lambda j: ring.jobs[j].get("created", ""))
        key = export_track_key(ring, job, track, output, _key_passphrase(key_passphrase, True),
                               overwrite=force, allow_pending=listed, check_track=not listed)
        typer.echo(f"wrote key for job {job} track {track} (key id {key.id}) to {output}")
    except VidanonError as exc:
        _fail(exc)


@keys_app.command("list", cls=_Command)
def keys_list(
    keyring: Annotated[Path, typer.Argument(show_default=False)],
    passphrase: Passflag = False,
) -> None:
    """Jobs in a keyring (never their keys), incomplete ones marked."""
    from vidanon.keys import Keyring

    try:
        ring = Keyring.open(keyring, passphrase=_passphrase(passphrase))
    except VidanonError as exc:
        _fail(exc)
    for job_id, e in sorted(ring.jobs.items(), key=lambda kv: kv[1].get("created", "")):
        status = ring.status(job_id)
        mark = "" if status == "complete" else "  INCOMPLETE (run did not finish)"
        tracks = e.get("key_tracks")
        n = f"{len(tracks)} tracks" if tracks is not None else "tracks unknown"
        typer.echo(f"{job_id}  {e.get('created', '?')}  {e.get('input', '?')} -> "
                   f"{e.get('output', '?')}  {n}{mark}")
    typer.echo(f"{len(ring.jobs)} jobs, {len(ring.jobs) - len(ring.complete_jobs())} incomplete")


@app.command(cls=_Command)
def inspect(sidecar_file: Annotated[Path, typer.Argument(metavar="SIDECAR")]) -> None:
    """Summarise a sidecar: input, model, settings, tracks. Never shows keys (it has none)."""
    from vidanon import sidecar

    try:
        doc = sidecar.read(sidecar_file)
    except VidanonError as exc:
        _fail(exc)
    inp = doc["input"]
    typer.echo(f"job {doc['job_id']}  created {doc.get('created')}  vidanon {doc.get('vidanon')}")
    typer.echo(f"input  {inp.get('name')}  {inp.get('width')}x{inp.get('height')}  "
               f"{inp.get('frames')} frames  sha256 {inp.get('sha256', '')[:16]}...")
    typer.echo(f"output {doc['output']['name']}  sha256 {doc['output']['sha256'][:16]}...")
    typer.echo(f"model  {doc['model']['name']} ({doc['model']['kind']}, "
               f"{doc['model']['crop_size']} px)")
    d = doc["settings"]["diffusion"]
    typer.echo(f"diffusion steps={d['steps']} refine={d['refine']}")
    typer.echo(f"{len(doc['tracks'])} tracks:")
    for tr in doc["tracks"]:
        modes = [r["mode"] for r in tr["frames"]]
        typer.echo(f"  track {tr['id']}: frames {tr['first_frame']}-{tr['last_frame']}, "
                   f"{modes.count('diffusion')} replaced, {modes.count('blur')} blurred, "
                   f"key id {tr['key_id']}"
                   + (f", linked to track {tr['key_track']}"
                      if tr.get("key_track", tr["id"]) != tr["id"] else ""))
        pv = tr.get("privacy")
        if pv:
            esc = ", escalated: " + " -> ".join(tr["escalations"]) if tr.get("escalations") else ""
            typer.echo(f"    privacy guard: {pv['frames_checked']} frames checked, max similarity "
                       f"{pv['max_similarity']:.3f} (threshold {pv['threshold']}){esc}"
                       + (" (blurred: not recoverable)" if tr.get("note") else ""))
    if doc.get("privacy_guard", {}).get("verified") is False:
        typer.echo("privacy guard: off (--no-verify)")


@app.command(cls=_Command)
def doctor() -> None:
    """Versions, codecs, GPU and models found: what to paste into a bug report."""
    import av
    import cv2
    import diffusers
    import torch

    from vidanon import __version__
    from vidanon.detect import YUNET_PATH
    from vidanon.diffusion.models import BUNDLED_DIR, bundled_available

    info = {
        "vidanon": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "diffusers": diffusers.__version__,
        "pyav": av.__version__,
        "opencv": cv2.__version__,
        "h264_encoder": "libx264" in av.codecs_available,
        "aac_decoder": "aac" in av.codecs_available,
        "detector": str(YUNET_PATH) if YUNET_PATH.exists() else None,
        "bundled_prior": str(BUNDLED_DIR) if bundled_available() else None,
        "keyring": str(default_keyring()),
    }
    typer.echo(json.dumps(info, indent=1))


@app.command("train-prior", cls=_Command)
def train_prior_cmd(
    data: Annotated[Path, typer.Option(help="Face npz (shared format) or image folder.")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, logs).")],
    resolution: int = 64,
    preset: str = "cpu",
    steps: int = 30000,
    batch_size: int = 128,
    resume: Annotated[Optional[Path], typer.Option()] = None,  # noqa: UP045
    time_limit_s: Annotated[Optional[float], typer.Option()] = None,  # noqa: UP045
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Train the pixel-space face prior (resumable)."""
    from vidanon.prior.train import train_prior

    try:
        path = train_prior(data, out, resolution=resolution, preset=preset, steps=steps,
                           batch_size=batch_size, resume=resume, device=device,
                           time_limit_s=time_limit_s, quiet=quiet)
        typer.echo(f"checkpoint: {path}")
    except VidanonError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
