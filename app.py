"""dsvl-chat: chat with DeepSeek-VL 7B about your images, in the browser.

    python app.py                                  # deepseek-community/deepseek-vl-7b-chat on 127.0.0.1:7860
    python app.py --model random:tiny              # try the interface on a tiny test model (answers are noise)
    python app.py --model /path/to/checkpoint      # a local copy of the model
    python app.py --help                           # every flag; each also reads a DSVL_* variable

The UI lives in dsvl_app/ (settings, history conversion, upload checks, runtime, Blocks layout).
"""

from dsvl_app.cli import main

if __name__ == "__main__":
    main()
