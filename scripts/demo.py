"""`make demo`: Label Studio and the EVF-SAM backend on this machine, with a pre-labelled sample project.

Installs (or reuses) Label Studio in .venv-ls, starts it and `python -m backend serve` (embedded mode: no Redis, the
model runs in the server) on loopback, creates the "EVF-SAM demo" project from label_config.xml with sample images,
connects the backend, runs "Retrieve Predictions", and prints where to log in. Ctrl-C stops everything.
A second run reuses the data dir (Label Studio database, images, project).

    .venv/bin/python scripts/demo.py [--checkpoint DIR_OR_REPO] [--data-dir .e2e/demo] [--check]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.ls_harness import (  # noqa: E402 - after the path fix-up that lets `python scripts/demo.py` run
    E2E_DIR,
    LABEL_CONFIG,
    BackendServer,
    Credentials,
    LabelStudioClient,
    LabelStudioError,
    LabelStudioServer,
    backend_environment,
    copy_data_dir,
    ensure_installed,
    free_port,
    make_samples,
    template_data_dir,
)

PROJECT_TITLE = "EVF-SAM demo"
BACKEND_TITLE = "EVF-SAM"


def pick_port(wanted: int) -> int:
    """`wanted` if it is free on 127.0.0.1 (0: any free port), else any free port."""
    if wanted:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", wanted)) != 0:
                return wanted
        print(f"demo: port {wanted} is taken, using another one")
    return free_port()


def ensure_project(ls: LabelStudioClient, files: Path, state: dict, image_count: int) -> int:
    """The demo project (reused when it still exists), with local-files tasks prompting for each shape."""
    known = {project["id"] for project in ls.projects()}
    if state.get("project") in known:
        print(f"demo: reusing project {state['project']}")
        return state["project"]
    project = ls.create_project(PROJECT_TITLE, LABEL_CONFIG.read_text(),
                                description="Sample images pre-labelled by EVF-SAM from text prompts")["id"]
    samples = make_samples(files / "samples", count=image_count, expressions=2)
    ls.add_local_storage(project, files / "samples" / "images", title="demo samples")
    ls.import_tasks(project, [{"data": {"image": f"/data/local-files/?d=samples/images/{sample.image.name}",
                                        "prompt": sample.prompts}} for sample in samples])
    print(f"demo: created project {project} with {len(samples)} synthetic images (evf_sam.data.synthetic)")
    return project


def connect(ls: LabelStudioClient, project: int, url: str) -> None:
    """Connect the backend at `url`, dropping connections (and their webhooks) to backends of earlier runs."""
    for backend in ls.backends(project):
        if backend["url"] == url:
            return
        ls.call("DELETE", f"/api/ml/{backend['id']}")
    for hook in ls.call("GET", "/api/webhooks/", params={"project": project}):
        if hook["url"].endswith("/webhook") and not hook["url"].startswith(url):
            ls.call("DELETE", f"/api/webhooks/{hook['id']}/")
    ls.connect_backend(project, url, title=BACKEND_TITLE, interactive=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=E2E_DIR / "demo",
                        help="where Label Studio's database, the images and the state live (default: .e2e/demo)")
    parser.add_argument("--checkpoint", help="EVF_SAM_CHECKPOINT for the backend (default: models/evf-demo)")
    parser.add_argument("--ls-port", type=int, default=8080, help="Label Studio port if free (0: any free port)")
    parser.add_argument("--backend-port", type=int, default=9090, help="backend port if free (0: any free port)")
    parser.add_argument("--images", type=int, default=6, help="sample images in a new project (default: 6)")
    parser.add_argument("--check", action="store_true", help="stop after pre-labelling instead of waiting for Ctrl-C")
    args = parser.parse_args(argv)

    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    state_path = data_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    credentials = Credentials()

    print("demo: checking Label Studio in .venv-ls (the first install takes about 2 minutes)")
    ensure_installed()
    ls_data = data_dir / "label-studio"
    if not ls_data.exists():
        print("demo: preparing the Label Studio database (first run only, about a minute)")
        copy_data_dir(template_data_dir(credentials), ls_data)
    files = data_dir / "files"
    files.mkdir(exist_ok=True)

    label_studio = LabelStudioServer(ls_data, files, port=pick_port(args.ls_port), credentials=credentials)
    settings = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": credentials.token,
                "LOCAL_FILES_DOCUMENT_ROOT": str(files), "CORRECTIONS_DIR": str(data_dir / "corrections"),
                "CHECKPOINTS_DIR": str(data_dir / "checkpoints")}
    if args.checkpoint:
        settings["EVF_SAM_CHECKPOINT"] = args.checkpoint
    backend = BackendServer(backend_environment(**settings), data_dir / "backend.log",
                            port=pick_port(args.backend_port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so `finally` stops the children on SIGTERM too
    try:
        print(f"demo: starting Label Studio on {label_studio.url} (log: {label_studio.log_path})")
        label_studio.start()
        print(f"demo: starting the backend on {backend.url} (log: {backend.log_path})")
        backend.start()
        ls = label_studio.client()
        project = ensure_project(ls, files, state, args.images)
        state_path.write_text(json.dumps({"project": project}))
        connect(ls, project, backend.url)
        started = time.monotonic()
        answer = ls.retrieve_predictions(project)
        labelled = sum(1 for task in ls.tasks(project) if task.get("total_predictions"))
        print(f"demo: {answer.get('detail', answer)} in {time.monotonic() - started:.1f} s; "
              f"{labelled} tasks carry predictions")
        print(f"\n  Label Studio:  {label_studio.url}/projects/{project}/data\n"
              f"  login:         {credentials.email} / {credentials.password}\n"
              f"  backend:       {backend.url} (connected as '{BACKEND_TITLE}'; type a prompt in a task's text box)\n")
        if args.check:
            return 0
        print("demo: running; press Ctrl-C to stop")
        while label_studio.process.poll() is None and backend.process.poll() is None:
            time.sleep(1)
        print("demo: a service stopped unexpectedly; see the logs above", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (LabelStudioError, RuntimeError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    finally:
        print("demo: stopping")
        backend.stop()
        label_studio.stop()


if __name__ == "__main__":
    sys.exit(main())
