"""A fake Hugging Face Hub on loopback, for tests: two real HTTP servers (tests/origin.py).

`api` stands for the Hub's host: `GET /api/models/{repo}[/revision/{rev}]` answers the JSON of
huggingface_hub's `HfApi.model_info(..., files_metadata=True)` (`?blobs=True`: siblings with
`size`, `blobId` and `lfs` {sha256, size, pointerSize}), and `/{repo}/resolve/{commit}/{file}`
redirects (302) to `cdn`, which serves the bytes, as the Hub does for LFS files. Branches
move: `publish` makes a new commit and points the branch (and, for `main`, the repository's
default answer) at it; older commits stay served.

    with open_fake_hub() as hub:
        commit = hub.publish("user/repo", {"m.Q4_K_M.gguf": data})

A gated repository (`gated={repo: token}`) answers its metadata to anyone (with `"gated":
"manual"`), as the Hub does, but `auth-check` and its files answer 401 GatedRepo
unless the request carries `Authorization: Bearer {token}`. Every request's
headers are recorded (`Seen.headers`), on the Hub's host and on the CDN.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from urllib.parse import quote

import attrs

from tests.origin import Faults, Origin, Resource, run_origin_in_thread


@attrs.define
class FakeHub:
    api: Origin
    cdn: Origin
    commits: int = 0
    gated: dict[str, str] = attrs.Factory(dict)  # repo -> the token that may read it

    @property
    def endpoint(self) -> str:
        return self.api.url("").rstrip("/")

    def publish(self, repo: str, files: dict[str, bytes], *, branch: str = "main",
                lfs_sha256: dict[str, str] | None = None) -> str:
        """A new commit of `repo` holding `files` (and a README outside LFS), at the head of
        `branch`; `lfs_sha256` overrides the sha256 the API tells for a file (a lie)."""
        self.commits += 1
        commit = hashlib.sha1(f"{repo}@{branch}#{self.commits}".encode()).hexdigest()
        siblings: list[dict[str, object]] = [
            {"rfilename": ".gitattributes", "blobId": "a" * 40, "size": 1519},
            {"rfilename": "README.md", "blobId": "b" * 40, "size": 42},
        ]
        for name, data in files.items():
            sha256 = (lfs_sha256 or {}).get(name) or hashlib.sha256(data).hexdigest()
            siblings.append({
                "rfilename": name,
                "blobId": hashlib.sha1(data).hexdigest(),
                "size": len(data),
                "lfs": {"sha256": sha256, "size": len(data), "pointerSize": 135},
            })
            self.cdn.add(f"/repos/{repo}/{commit}/{name}", data)
            resolve = f"/{repo}/resolve/{commit}/{quote(name)}"
            self.api.redirect(resolve, self.cdn.url(f"/repos/{repo}/{commit}/{name}"))
            if repo in self.gated:
                self._gate(resolve, repo)
        user = repo.split("/", 1)[0]
        doc = {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
            "author": user, "sha": commit, "lastModified": "2026-01-02T03:04:05.000Z",
            "private": False, "disabled": False,
            "gated": "manual" if repo in self.gated else False, "downloads": 0, "likes": 0,
            "library_name": "gguf", "tags": ["gguf"], "siblings": siblings,
            "createdAt": "2026-01-01T00:00:00.000Z", "spaces": [],
            "usedStorage": sum(len(d) for d in files.values()),
        }
        body = json.dumps(doc).encode()
        self.api.add(f"/api/models/{repo}/revision/{commit}", body)
        self.api.add(f"/api/models/{repo}/revision/{quote(branch, safe='')}", body)
        if branch == "main":
            self.api.add(f"/api/models/{repo}", body)
        if repo in self.gated:
            self.api.add(f"/api/models/{repo}/auth-check", b"{}")
            self._gate(f"/api/models/{repo}/auth-check", repo)
        return commit

    def seen_authorization(self, origin: Origin) -> list[str]:
        """The Authorization headers `origin` received, in order."""
        return [v for r in origin.requests for k, v in r.headers if k == "authorization"]

    def _gate(self, path: str, repo: str) -> None:
        faults = self.api.resources[path].faults
        faults.status = 401
        faults.spare = ("authorization", f"Bearer {self.gated[repo]}")
        faults.headers = [("X-Error-Code", "GatedRepo"), (
            "X-Error-Message", f"Access to model {repo} is restricted. You must have access "
            "to it and be authenticated to access it. Please log in.")]

    def missing(self, repo: str) -> None:
        """Answer for `repo` as the Hub does for a repository that does not exist (or that an
        anonymous caller may not see): 401 with X-Error-Code RepoNotFound."""
        for path in (f"/api/models/{repo}", f"/api/models/{repo}/revision/main"):
            self.api.resources[path] = Resource(b"", '"x"', "Thu, 01 Jan 2026 00:00:00 GMT")
            self.api.resources[path].faults = Faults(
                status=401, headers=[("X-Error-Code", "RepoNotFound"),
                                     ("X-Error-Message", "Repository not found")])


def split_files(stem: str, parts: list[bytes]) -> dict[str, bytes]:
    """A split GGUF set's files as a repository holds them (`{stem}-0000k-of-0000n.gguf`), for
    `publish`; `parts` from tests/gguf_factory.split_gguf."""
    count = len(parts)
    return {f"{stem}-{k:05d}-of-{count:05d}.gguf": data for k, data in enumerate(parts, 1)}


@contextlib.contextmanager
def open_fake_hub() -> Iterator[FakeHub]:
    with run_origin_in_thread() as api, run_origin_in_thread() as cdn:
        yield FakeHub(api=api, cdn=cdn)
