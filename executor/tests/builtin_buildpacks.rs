//! Kiln's own buildpacks end to end: each app of `testdata/apps/` built with nothing but
//! `executor --context APP --destination REF` (plus the test's registry maps and work
//! directory), on the default images of its language (stand-ins made from Debian packages,
//! pushed to a loopback registry), pulled back, run with runc and asked over HTTP on `PORT`;
//! each image's size against the hand-written multi-stage Dockerfile beside the app; and
//! broken apps that must fail naming the file and the tool's message, pushing nothing.

mod support;

use kiln_testkit::langs::LangImage;
use support::apps::{check_size, stderr, Apps, SizeBound};

/// Builds `name` with the buildpacks and with its Dockerfile, checks their sizes as `bound`
/// says; the build log.
fn build_both(apps: &Apps, name: &str, app: &std::path::Path, bound: SizeBound) -> String {
    let out = apps.build(app, &format!("apps/{name}:bp"), &[]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("front end: buildpacks"), "{log}");
    let docker = apps.build_dockerfile(app, name, &format!("apps/{name}:dockerfile"));
    assert!(docker.status.success(), "{}", stderr(&docker));
    check_size(
        apps,
        name,
        &format!("apps/{name}:bp"),
        &format!("apps/{name}:dockerfile"),
        bound,
    );
    log
}

/// An Express app without a lockfile, started through its `main`; a one-file change rebuilds
/// without reinstalling: the dependency layer keeps its digest.
#[test]
fn an_express_app_runs_and_keeps_its_dependencies_across_a_source_change() {
    let apps = Apps::new(&[LangImage::NodeBuild, LangImage::NodeRun]);
    let app = apps.app("node-express");
    let log = build_both(&apps, "node-express", &app, SizeBound::Whole);
    assert!(
        log.contains("the app looks like a Node.js app: build image docker.io/library/node:22, run image docker.io/library/node:22-slim"),
        "{log}"
    );
    assert!(
        log.contains("node: running npm install --omit=dev"),
        "{log}"
    );
    assert!(log.contains("buildpack group: kiln/node@0.1.0"), "{log}");
    assert!(
        log.contains("node: process web: node server.js (from \"main\" (server.js))"),
        "{log}"
    );
    let served = apps.serve("apps/node-express:bp");
    let answer = served.get("/");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("hello from express (NODE_ENV=production)"),
        "{answer}\n{}",
        served.log()
    );
    assert_eq!(served.flat.config["config"]["User"], "1000:1000");
    drop(served);

    let before = apps.diff_ids("apps/node-express:bp");
    std::fs::write(
        app.join("greeting.js"),
        "exports.greeting = () => 'hello again';\n",
    )
    .unwrap();
    let out = apps.build(&app, "apps/node-express:bp", &[]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("node: reusing node_modules"), "{log}");
    assert!(!log.contains("running npm install"), "{log}");
    let after = apps.diff_ids("apps/node-express:bp");
    let metadata = |repo_tag: &str| -> serde_json::Value {
        let flat = kiln_testkit::image::flatten(&apps.registry, repo_tag);
        let label = flat.config["config"]["Labels"]["io.buildpacks.lifecycle.metadata"]
            .as_str()
            .unwrap()
            .to_owned();
        serde_json::from_str(&label).unwrap()
    };
    let modules = metadata("apps/node-express:bp")["buildpacks"][0]["layers"]["modules"]["sha"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        before.contains(&modules),
        "the same modules layer as before"
    );
    assert!(after.contains(&modules));
    assert_ne!(before, after, "the app layer changed");
    let served = apps.serve("apps/node-express:bp");
    assert!(served.get("/").contains("hello again"), "{}", served.log());
}

/// An npm app with a lockfile and a build script: `npm ci` with devDependencies for the
/// build, only production dependencies in the image, the start script as the web process.
#[test]
fn an_npm_app_with_a_lockfile_runs_its_build_script() {
    let apps = Apps::new(&[LangImage::NodeBuild, LangImage::NodeRun]);
    let app = apps.app("node-build");
    let log = build_both(&apps, "node-build", &app, SizeBound::Whole);
    assert!(log.contains("node: running npm ci --include=dev"), "{log}");
    assert!(log.contains("node: running npm ci --omit=dev"), "{log}");
    assert!(log.contains("built dist/server.js"), "{log}");
    assert!(log.contains("engines.node \">=18\" is satisfied"), "{log}");
    assert!(
        log.contains("node: process web: node dist/server.js (from the start script"),
        "{log}"
    );
    let served = apps.serve("apps/node-build:bp");
    let answer = served.get("/");
    assert!(
        answer.contains("made by the build script; a day is 86400000 ms"),
        "{answer}\n{}",
        served.log()
    );
    let modules = served
        .flat
        .rootfs
        .join("layers/kiln_node/modules/node_modules");
    assert!(modules.join("ms").is_dir());
    assert!(
        !modules.join("picocolors").exists(),
        "devDependencies stay out of the image"
    );
}

/// A Flask app with requirements.txt and a Procfile: a virtual environment in a launch layer,
/// gunicorn started by the Procfile's shell command with `$PORT`.
#[test]
fn a_flask_app_runs_under_its_procfile() {
    let apps = Apps::new(&[LangImage::PythonBuild, LangImage::PythonRun]);
    let app = apps.app("python-flask");
    let log = build_both(&apps, "python-flask", &app, SizeBound::Whole);
    assert!(
        log.contains("python: running pip install -r requirements.txt"),
        "{log}"
    );
    assert!(
        log.contains("python: process web: gunicorn app:app"),
        "{log}"
    );
    assert!(
        log.contains("buildpack group: kiln/python@0.1.0, kiln/procfile@0.1.0"),
        "{log}"
    );
    assert!(log.contains("procfile: process web: gunicorn"), "{log}");
    let served = apps.serve("apps/python-flask:bp");
    let answer = served.get("/");
    assert!(
        answer.contains("hello from flask in /layers/kiln_python/venv"),
        "{answer}\n{}",
        served.log()
    );
}

/// A Go module with two packages: one static executable on the smallest base, which has no
/// shell to run anything else.
#[test]
fn a_go_module_runs_on_the_smallest_base() {
    let apps = Apps::new(&[LangImage::GoBuild, LangImage::Smallest]);
    let app = apps.app("go-two");
    let log = build_both(&apps, "go-two", &app, SizeBound::WholeWithMuslLauncher);
    assert!(
        log.contains("build image docker.io/library/golang:1.19, run image gcr.io/distroless/static-debian12:latest"),
        "{log}"
    );
    assert!(
        log.contains("go: process web: /layers/kiln_go/app/bin/greeter"),
        "{log}"
    );
    let served = apps.serve("apps/go-two:bp");
    assert!(
        served.get("/").contains("hello from go"),
        "{}",
        served.log()
    );
    let rootfs = &served.flat.rootfs;
    assert!(!rootfs.join("bin/sh").exists(), "no shell in the run image");
    let bins: Vec<_> = std::fs::read_dir(rootfs.join("layers/kiln_go/app/bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(bins, ["greeter"], "one main package, one executable");
}

/// A static site: served by the buildpack's static file server with the right types.
#[test]
fn a_static_site_is_served_with_its_types() {
    let apps = Apps::new(&[LangImage::Busybox, LangImage::Smallest]);
    let app = apps.app("static-site");
    let log = build_both(&apps, "static-site", &app, SizeBound::Whole);
    assert!(
        log.contains("the app looks like a static site app"),
        "{log}"
    );
    let served = apps.serve("apps/static-site:bp");
    let home = served.get("/");
    assert!(home.starts_with("HTTP/1.1 200"), "{home}\n{}", served.log());
    assert!(home.contains("Content-Type: text/html"), "{home}");
    assert!(home.contains("hello from a static site"), "{home}");
    for (path, mime) in [
        ("/style.css", "text/css"),
        ("/app.js", "text/javascript"),
        ("/img/logo.svg", "image/svg+xml"),
    ] {
        let answer = served.get(path);
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        assert!(
            answer.contains(&format!("Content-Type: {mime}")),
            "{path}: {answer}"
        );
    }
    assert!(served.get("/missing").starts_with("HTTP/1.1 404"));
}

/// Broken apps fail the build with the file and the tool's own message, and push nothing.
#[test]
fn broken_apps_fail_naming_the_file_and_push_nothing() {
    let apps = Apps::new(&[
        LangImage::NodeBuild,
        LangImage::NodeRun,
        LangImage::PythonBuild,
        LangImage::PythonRun,
        LangImage::GoBuild,
        LangImage::Smallest,
    ]);
    let node = apps.app("node-express");
    std::fs::write(node.join("package.json"), "{\"name\": \"x\",,}\n").unwrap();
    let python = apps.app("python-flask");
    std::fs::write(
        python.join("requirements.txt"),
        "flask==3.0.3\nkiln-test-no-such-package-zq==1.0\n",
    )
    .unwrap();
    let go = apps.app("go-two");
    std::fs::write(
        go.join("greet/greet.go"),
        "package greet\n\nfunc Hello(who string) string {\n\treturn undefinedName + who\n}\n",
    )
    .unwrap();
    let strict = apps.app("node-build");
    let package = std::fs::read_to_string(strict.join("package.json")).unwrap();
    std::fs::write(
        strict.join("package.json"),
        package.replace("\">=18\"", "\">=99\""),
    )
    .unwrap();
    let cases: [(&std::path::Path, &str, &[&str], Vec<String>); 4] = [
        (
            &node,
            "broken/node",
            &["package.json: not valid JSON", "Unexpected token"],
            vec![],
        ),
        (
            &python,
            "broken/python",
            &[
                "requirements.txt",
                "No matching distribution found for kiln-test-no-such-package-zq==1.0",
            ],
            vec![],
        ),
        (
            &go,
            "broken/go",
            &[
                "greet/greet.go:4:9: undefined: undefinedName",
                "go build failed",
            ],
            vec![],
        ),
        (
            &strict,
            "broken/engines",
            &[
                "engines.node \">=99\" is not satisfied",
                "BP_NODE_STRICT_ENGINES=true",
            ],
            vec!["--env=BP_NODE_STRICT_ENGINES=true".into()],
        ),
    ];
    for (app, destination, needles, extra) in cases {
        let out = apps.build(app, &format!("{destination}:1"), &extra);
        let log = stderr(&out);
        assert_ne!(out.status.code(), Some(0), "{destination}: {log}");
        for needle in needles {
            assert!(log.contains(needle), "{destination}: {needle} in {log}");
        }
        let last = log.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{destination}: {log}");
        assert!(
            !apps.exists(&format!("{destination}:1")),
            "{destination}: nothing pushed"
        );
    }
}
