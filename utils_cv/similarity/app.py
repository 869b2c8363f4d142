"""The browser app over a saved collection: ``utils-cv-similarity serve INDEX`` (extra ``app``).

Three tabs: **Search** (a query by file upload, pasted image or webcam snapshot, and a live
webcam mode that re-queries, throttled, when the frame changes; a gallery of the k nearest
images with distance and path), **Duplicates** (near-duplicate groups, largest first, and the
files one could remove; computed on first use, once) and **Index** (size, model, backend, when
built). Nothing in the app writes to the user's folders.

Safe by default:

* bound to 127.0.0.1 unless ``host`` says otherwise;
* no path given by the browser is ever opened: result images are thumbnails made here and
  handed to Gradio as in-memory images, so Gradio serves only its own cache of them; nothing
  is added to ``allowed_paths`` and the image folder and the collection are in
  ``blocked_paths`` on top (``../../etc/passwd`` and the collection's own files are refused);
* uploads are limited in bytes (``max_upload_mb``, checked by Gradio while the file
  arrives) and in pixels (``max_pixels``, read from the file's header before any decoding).
  Live webcam frames arrive as base64 images that Gradio decodes itself, under Pillow's own
  decompression-bomb limit (about 179 megapixels); they are refused over ``max_pixels``
  after decoding. Pillow's global limit is left alone: lowering it would also stop the
  thumbnails of large images of the collection.

Offline: analytics and Gradio's version check off (``GRADIO_ANALYTICS_ENABLED=False``), no
server-side rendering (no Node), a theme of system fonts so the page asks no font CDN; the
browser test checks that the page loads nothing from outside the local server.

The model and the index are loaded once, in :class:`SearchService`, and shared by all
sessions: searches only read them (eval-mode forward under ``inference_mode``, index search),
so Gradio's queue runs ``concurrency`` of them at a time.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from utils_cv.similarity import collection as collection_mod
from utils_cv.similarity import dedup
from utils_cv.similarity._checks import positive_int

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_PIXELS", "SearchService", "build_app", "run_serve", "serve"]

DEFAULT_MAX_PIXELS = 50_000_000  # a 50-megapixel photo; about 150 MB once decoded
THUMBNAIL = 192  # longest side of a result image in pixels
LIVE_EVERY = 1.0  # seconds between two frames of the live webcam mode
LIVE_CHANGE = 3.0  # mean absolute change (0-255, 32x32 grey) under which a live frame is not searched again


def _offline_environment() -> None:
    """Gradio reads these when it is imported and launched: no analytics, no version check."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


class SearchService:
    """The collection, its embedding model and the searches; everything the app shows.

    Args:
        collection_dir: a folder written by ``utils-cv-similarity index``.
        model: the trained model file the collection was built with, when it moved since
            (its sha256 must be the recorded one); None loads the model the collection names.
        max_pixels: largest query image accepted, in pixels.
    """

    def __init__(self, collection_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        from utils_cv.similarity.features import FeatureExtractor

        positive_int(max_pixels, "max_pixels")
        self.max_pixels = int(max_pixels)
        self.collection = collection_mod.open_collection(collection_dir)
        spec = dict(self.collection.model)
        if model is not None:
            given = collection_mod.model_spec(model=model)
            if "model" not in spec or given["sha256"] != spec.get("sha256"):
                raise ValueError(f"The 'model' file {str(model)!r} is not the model the collection was built with "
                                 f"({spec.get('model', spec.get('backbone'))}); query a collection only with its own "
                                 "model, or index the folder again with this one.")
            spec = given
        module, transform = collection_mod.load_embedder(spec)
        self.extractor = FeatureExtractor(module, transform, batch_size=1)
        self.ids = [e["path"] for e in self.collection.entries]
        self._dups = None
        self._dups_lock = threading.Lock()
        # at most 512 thumbnails of 192 px (about 55 MB) are kept decoded
        self._thumbnail = functools.lru_cache(maxsize=512)(self._make_thumbnail)

    # ------------------------------------------------------------------ queries
    def check_pixels(self, size: tuple[int, int]) -> None:
        if size[0] * size[1] > self.max_pixels:
            raise ValueError(f"The image has {size[0]} x {size[1]} pixels, more than the app accepts "
                             f"({self.max_pixels:,}); send a smaller image (or start the app with a larger "
                             "max_pixels).")

    def open_query(self, item) -> Image.Image:
        """A query as an RGB image: an uploaded file (its pixel count read from the header
        before decoding), a PIL image or an (H, W, 3) array."""
        from utils_cv.similarity.features import to_rgb_image

        if isinstance(item, (str, os.PathLike)):
            try:
                with Image.open(item) as im:
                    self.check_pixels(im.size)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ValueError(f"The image has more pixels than the app accepts ({exc}); send a smaller "
                                 "image.") from exc
            except OSError as exc:
                raise ValueError(f"The query is not an image that can be read ({exc}).") from exc
            return to_rgb_image(item)
        size = item.size if isinstance(item, Image.Image) else np.asarray(item).shape[1::-1]
        self.check_pixels(size)
        return to_rgb_image(item)

    def search(self, item, k: int = 8, max_distance: float | None = None) -> list[tuple[str, float]]:
        """The ``k`` nearest indexed images of a query (see :meth:`open_query`) as
        ``(relative path, L2 distance)``, nearest first, those farther than ``max_distance`` left out."""
        positive_int(k, "k")
        k = min(int(k), len(self.collection.index))
        image = self.open_query(item)
        result = self.extractor.extract([image], on_error="raise", progress=False)
        D, ids = self.collection.index.search(result.features, k)
        return [(str(i), float(d)) for d, i in zip(D[0], ids[0])
                if i is not None and (max_distance is None or d <= max_distance)]

    def _make_thumbnail(self, rel: str) -> Image.Image:
        from utils_cv.similarity.features import to_rgb_image

        im = to_rgb_image(self.collection.abspath(rel))
        im.thumbnail((THUMBNAIL, THUMBNAIL))
        return im

    def thumbnail(self, rel: str) -> Image.Image:
        """A small RGB copy of an indexed image (``rel``: one of the collection's ids, never a
        path from the browser); a grey tile when the file cannot be read any more."""
        if rel not in self._known:
            raise ValueError(f"{rel!r} is not an image of the collection.")
        try:
            return self._thumbnail(rel)
        except (OSError, ValueError) as exc:
            logger.warning("cannot show %s: %s", rel, exc)
            return Image.new("RGB", (THUMBNAIL, THUMBNAIL), (200, 200, 200))

    @functools.cached_property
    def _known(self) -> frozenset:
        return frozenset(self.ids)

    # ------------------------------------------------------------------ duplicates and facts
    def duplicates(self, keep: str = "largest"):
        """``(groups, remove)``: near-duplicate groups of relative paths (largest first, each
        a :class:`~utils_cv.similarity.dedup.DuplicateGroup`) and the relative paths one could
        remove. Computed on the first call, then kept."""
        with self._dups_lock:
            if self._dups is None:
                col = self.collection
                groups = col.duplicate_groups()
                by_abs = {str(col.abspath(i)): i for g in groups for i in g.ids}
                remove = dedup.duplicates_to_remove([[str(col.abspath(i)) for i in g.ids] for g in groups], keep)
                self._dups = (groups, [by_abs[p] for p in remove])
            return self._dups

    def facts(self) -> dict:
        col = self.collection
        model = col.model.get("backbone") or Path(col.model.get("model", "?")).name
        return {"images": len(col.entries), "dimensions": int(col.features.shape[1]), "model": model,
                "backend": getattr(col.index, "backend", "?"), "created": col.created or "?",
                "skipped when indexed": len(col.skipped), "folder": str(col.root)}


# ---------------------------------------------------------------------------- the page
def _theme():
    import gradio as gr

    # system fonts only: the default theme loads its fonts from a CDN
    return gr.themes.Default(font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                             font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])


def _gallery_items(service: SearchService, hits) -> list:
    return [(service.thumbnail(rel), f"{d:.3f}  {rel}") for rel, d in hits]


def build_app(collection_dir: str | os.PathLike, model: str | os.PathLike | None = None, max_upload_mb: float = 20,
              max_pixels: int = DEFAULT_MAX_PIXELS, service: SearchService | None = None):
    """The app as a ``gradio.Blocks`` (not launched; :func:`serve` launches it with the limits).

    Args:
        collection_dir: a folder written by ``utils-cv-similarity index``.
        model: see :class:`SearchService`.
        max_upload_mb: shown on the page; :func:`serve` enforces it.
        max_pixels: largest query image, in pixels.
        service: an opened :class:`SearchService` to reuse (then the three above are ignored).
    """
    _offline_environment()
    import gradio as gr

    service = service or SearchService(collection_dir, model=model, max_pixels=max_pixels)
    n = len(service.ids)

    def run_search(item, k, cutoff):
        if item is None:
            return [], "Upload, paste or take a picture to search."
        start = time.perf_counter()
        try:
            hits = service.search(item, int(k), None if not cutoff or cutoff >= 2 else float(cutoff))
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        ms = (time.perf_counter() - start) * 1000
        return _gallery_items(service, hits), f"{len(hits)} result(s) in {ms:.0f} ms"

    def run_live(frame, k, cutoff, last):
        if frame is None:
            return gr.skip(), gr.skip(), last
        small = np.asarray(ImageOps.grayscale(frame).resize((32, 32)), dtype=np.float32)
        if last is not None and float(np.abs(small - last).mean()) < LIVE_CHANGE:
            return gr.skip(), gr.skip(), last  # the same scene: keep the results shown
        gallery, status = run_search(frame, k, cutoff)
        return gallery, f"live: {status}", small

    def show_duplicates():
        groups, remove = service.duplicates()
        marked = set(remove)
        items, lines = [], [f"**{len(groups)} group(s)** of near duplicates among {n} images; "
                            f"**{len(remove)} file(s)** could be removed (keeping the largest image of each "
                            "group). Nothing is deleted.", "", "| group | distance | file | suggestion |",
                            "|---|---|---|---|"]
        for g_no, g in enumerate(groups, 1):
            for rel, d in zip(g.ids, g.distances):
                flag = "remove?" if rel in marked else "keep"
                lines.append(f"| {g_no}{' (identical)' if g.exact else ''} | {d:.3f} | `{rel}` | {flag} |")
                if g_no <= 12:
                    items.append((service.thumbnail(rel), f"group {g_no} · {flag} · {rel}"))
        return "\n".join(lines), items

    facts = service.facts()
    with gr.Blocks(title="utils_cv image similarity", analytics_enabled=False, delete_cache=(600, 600)) as blocks:
        gr.Markdown(f"## Image similarity search · {n} indexed images")
        with gr.Tabs():
            with gr.Tab("Search", id="search"):
                with gr.Row():
                    with gr.Column(scale=1):
                        query = gr.Image(label="query: upload, paste or webcam",
                                         sources=["upload", "clipboard", "webcam"], type="filepath",
                                         image_mode=None, height=280, elem_id="query")
                        live = gr.Image(label="live webcam (re-queries when the picture changes)",
                                        sources=["webcam"], streaming=True, type="pil", height=200,
                                        elem_id="live")
                        k = gr.Slider(1, min(50, n), value=min(8, n), step=1, label="k (results)", elem_id="k")
                        cutoff = gr.Slider(0, 2, value=2, step=0.01, elem_id="cutoff",
                                           label="distance cut-off (L2; 2 = no cut-off)")
                        button = gr.Button("Search", variant="primary", elem_id="search-button")
                    with gr.Column(scale=2):
                        status = gr.Markdown("Upload, paste or take a picture to search.", elem_id="status")
                        gr.Markdown(f"Images up to {max_upload_mb:g} MB and {max_pixels / 1e6:g} megapixels; nothing is "
                                    "stored.", elem_id="limits")
                        gallery = gr.Gallery(label="nearest images (distance, path)", columns=3, height=560,
                                             format="jpeg", object_fit="contain", elem_id="results")
                last = gr.State(None)
                query.change(run_search, [query, k, cutoff], [gallery, status], api_name="search")
                button.click(run_search, [query, k, cutoff], [gallery, status], api_name=False)
                live.stream(run_live, [live, k, cutoff, last], [gallery, status, last], stream_every=LIVE_EVERY,
                            time_limit=300, api_name=False, concurrency_limit=None)
            with gr.Tab("Duplicates", id="duplicates"):
                dup_button = gr.Button("Find near duplicates", elem_id="dup-button")
                dup_text = gr.Markdown(elem_id="dup-text")
                dup_gallery = gr.Gallery(label="the 12 largest groups", columns=6, format="jpeg", elem_id="dups")
                dup_button.click(show_duplicates, None, [dup_text, dup_gallery], api_name=False)
            with gr.Tab("Index", id="index"):
                gr.Markdown("\n".join(["| | |", "|---|---|"] + [f"| {key} | `{value}` |" for key, value in facts.items()]),
                            elem_id="facts")
    blocks.search_service = service
    return blocks


def serve(collection_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 7860,
          model: str | os.PathLike | None = None, max_upload_mb: float = 20, max_pixels: int = DEFAULT_MAX_PIXELS,
          concurrency: int = 4, block: bool = True):
    """Launch the app (see the module doc for what it serves and refuses) and, with
    ``block``, serve until interrupted.

    Args:
        host: the address to listen on; anything but localhost exposes the collection's images
            to the network.
        concurrency: searches run at the same time (Gradio's queue).
        block: False returns ``(blocks, url)`` with the server running in a thread.
    """
    if not (isinstance(max_upload_mb, (int, float)) and not isinstance(max_upload_mb, bool) and max_upload_mb > 0):
        raise ValueError(f"The 'max_upload_mb' parameter must be a positive number of megabytes. Got {max_upload_mb!r}.")
    positive_int(concurrency, "concurrency")
    positive_int(max_pixels, "max_pixels")
    _offline_environment()
    import gradio as gr

    blocks = build_app(collection_dir, model=model, max_upload_mb=max_upload_mb, max_pixels=max_pixels)
    col = blocks.search_service.collection
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can search the collection and see its "
                       "images", host)
    blocks.queue(default_concurrency_limit=concurrency, max_size=64)
    _, url, _ = blocks.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True,
                              prevent_thread_lock=True, allowed_paths=[], max_file_size=f"{max_upload_mb}mb",
                              blocked_paths=[str(col.root), str(Path(col.path).resolve())],
                              ssr_mode=False, pwa=False, mcp_server=False, theme=_theme(), show_error=True,
                              enable_monitoring=False, footer_links=[])
    logger.info("serving %d images of %s at %s (Ctrl+C stops)", len(col.entries), col.path, url)
    if not block:
        return blocks, url
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        blocks.close()
    return blocks, url


def run_serve(args) -> int:
    """``utils-cv-similarity serve``: ``args`` has ``index``, ``model``, ``host``, ``port`` and
    ``max_upload_mb``."""
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise ImportError("The browser app needs Gradio: pip install 'utils_cv[app]'.") from exc
    serve(args.index, host=args.host, port=args.port, model=args.model, max_upload_mb=args.max_upload_mb)
    return 0
