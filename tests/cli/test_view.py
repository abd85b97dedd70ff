"""`histodetect view` and `serve --slides` on the command line: options and bad folders."""

from __future__ import annotations

import os
import subprocess
import sys

from histodetect.cli.main import build_parser


def test_view_binds_to_loopback_and_takes_several_folders_by_default():
    args = build_parser().parse_args(["view", "maps1", "maps2"])
    assert [str(m) for m in args.maps] == ["maps1", "maps2"]
    assert args.host == "127.0.0.1" and args.port == 8000 and args.slide_dir == []
    assert args.api_key == os.environ.get("HISTODETECT_API_KEY")
    serve = build_parser().parse_args(["serve", "run", "--slides", "m", "--slide-dir", "d"])
    assert [str(m) for m in serve.slides] == ["m"] and [str(d) for d in serve.slide_dir] == ["d"]


def test_view_of_a_missing_or_empty_folder_is_a_one_line_error_with_exit_2(tmp_path):
    for folder, message in (
        (tmp_path / "nowhere", "no such folder of slide maps"),
        (tmp_path, "no slide maps here"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "histodetect.cli", "view", str(folder), "--port", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("histodetect view: error:")
