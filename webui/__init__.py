"""The browser UI: a Gradio Blocks page built from one module per tab (see `webui.app.TABS`)."""
