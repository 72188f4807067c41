# What a person would write by hand for go-two: a static binary on the smallest base.
FROM docker.io/library/golang:1.19 AS build
WORKDIR /src
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/greeter .

FROM gcr.io/distroless/static-debian12:latest
COPY --from=build /out/greeter /greeter
USER 65532:65532
ENTRYPOINT ["/greeter"]
