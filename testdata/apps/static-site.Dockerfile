# What a person would write by hand for static-site on the smallest base: the site and a
# static web server (busybox's httpd, the smallest at hand).
FROM docker.io/library/busybox:stable AS tools

FROM gcr.io/distroless/static-debian12:latest
COPY --from=tools /bin/busybox /bin/busybox
COPY . /www
USER 65532:65532
ENTRYPOINT ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
