"""The test harness's clean-up of Fast DDS shared-memory segments left by killed processes."""
import mmap
import time
from pathlib import Path

from ros_support import remove_orphaned_fastdds_segments


def _segment(folder: Path, name: str, size: int = 4096) -> Path:
    p = folder / name
    p.write_bytes(bytes(size))
    return p


def test_removes_only_unmapped_segments_of_this_session(tmp_path: Path):
    before = _segment(tmp_path, "fastdds_00000000000000aa")  # older than the session: not ours
    time.sleep(0.05)
    since = time.time()
    time.sleep(0.05)
    orphan = _segment(tmp_path, "fastdds_00000000000000bb")
    orphan_el = _segment(tmp_path, "fastdds_00000000000000bb_el", 0)
    live = _segment(tmp_path, "fastdds_00000000000000cc")
    live_el = _segment(tmp_path, "fastdds_00000000000000cc_el", 0)
    port = _segment(tmp_path, "fastddsport7000")
    other = _segment(tmp_path, "fastdds_not_a_segment")
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:  # mapped by this (live) process
        m[0] = 1
        assert remove_orphaned_fastdds_segments(since, tmp_path, min_age=60) == []  # too young
        removed = remove_orphaned_fastdds_segments(since, tmp_path, min_age=0)
        assert sorted(removed) == [orphan.name, orphan_el.name]
        assert live.exists() and live_el.exists()
    assert before.exists() and port.exists() and other.exists() and not orphan.exists() and not orphan_el.exists()
    assert sorted(remove_orphaned_fastdds_segments(since, tmp_path, min_age=0)) == [live.name, live_el.name]
