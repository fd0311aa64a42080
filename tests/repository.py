"""The repository's own files, what a commit of the working tree would hold, with or without git:
tests/test_docs.py reads them and bench/mutation_check.py copies them. Without .git (an unpacked archive, or
the mutation check's own copy) the tree is walked, leaving out what .gitignore lists."""
import fnmatch
import os
import subprocess
from pathlib import Path


def repository_files(root):
    """Tracked files and new ones git does not ignore (a new test file counts), sorted."""
    root = Path(root)
    if (root / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                check=True, capture_output=True, text=True).stdout.split("\0")
        # a tracked file deleted in the working tree is not part of it
        return sorted(root / name for name in listed if name and (root / name).exists())
    patterns = [line.strip().rstrip("/") for line in (root / ".gitignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")] + [".git"]

    def ignored(path):
        relative = path.relative_to(root).as_posix()
        return any(fnmatch.fnmatch(path.name, p) or fnmatch.fnmatch(relative, p) for p in patterns)

    files = []
    for folder, subfolders, names in os.walk(root):  # links (demo_assets in the check's copy) are not followed
        subfolders[:] = [name for name in subfolders if not ignored(Path(folder) / name)]
        files += [Path(folder) / name for name in names if not ignored(Path(folder) / name)]
    return sorted(files)
