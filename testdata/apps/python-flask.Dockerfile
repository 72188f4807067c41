# What a person would write by hand for python-flask: a virtual environment made in the full
# image, copied onto the slim one.
FROM docker.io/library/python:3.12 AS build
RUN python3 -m venv /venv
COPY requirements.txt /app/
RUN /venv/bin/pip install --disable-pip-version-check -r /app/requirements.txt
COPY . /app

FROM docker.io/library/python:3.12-slim
COPY --from=build /venv /venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/venv/bin:$PATH PORT=8080
USER 1000:1000
CMD ["sh", "-c", "gunicorn --bind 0.0.0.0:$PORT --workers 2 app:app"]
