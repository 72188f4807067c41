"""A Flask app that gunicorn serves on $PORT (see the Procfile)."""
import os

from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return f"hello from flask in {os.environ.get('VIRTUAL_ENV', 'no venv')}\n"
