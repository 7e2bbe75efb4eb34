"""Small scripts the page runs itself (Gradio's `js=` on an event), kept here so every tab uses one copy."""


def follow_newest_js(selector: str) -> str:
    """Keep each read-only textbox matched by `selector` at its newest line while it grows, unless the
    user has scrolled up to read; scrolling back to the bottom follows again. Gradio 6's `autoscroll`
    left such boxes at their first line. Run it when a box changes and when its tab is shown (a box
    filled while hidden had no height to scroll)."""
    return """() => {
  for (const box of document.querySelectorAll(%r)) {
    if (!box.dataset.follow) {
      box.dataset.follow = 'yes';
      box.addEventListener('scroll', () => {
        box.dataset.follow = box.scrollHeight - box.scrollTop - box.clientHeight < 24 ? 'yes' : 'no';
      });
    }
    if (box.dataset.follow === 'yes') setTimeout(() => { box.scrollTop = box.scrollHeight; }, 50);
  }
}""" % selector
