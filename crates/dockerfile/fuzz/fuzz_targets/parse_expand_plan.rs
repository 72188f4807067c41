//! Arbitrary bytes through every layer of kiln-dockerfile: syntax tree and dump, word
//! expansion (both escape characters), typed validation, planning for every target, and the
//! expanded steps of every needed stage. Any panic is a bug.

#![no_main]

use std::collections::HashMap;

use kiln_dockerfile::{parse_ast, Base, Dockerfile, Instruction, Lexer, PlanOptions};
use libfuzzer_sys::fuzz_target;

fn plan_and_expand(dockerfile: &Dockerfile, options: &PlanOptions) {
    let Ok(plan) = dockerfile.plan(options) else {
        return;
    };
    let _ = plan.levels();
    let mut finished: HashMap<usize, Vec<(String, String)>> = HashMap::new();
    for stage in plan.stages() {
        let inherited = match stage.base {
            Base::Stage(i) => finished.get(&i).cloned().unwrap_or_default(),
            Base::Image(_) => vec![("PATH".to_string(), "/usr/bin:/bin".to_string())],
            Base::Scratch => Vec::new(),
        };
        if let Ok(steps) = stage.steps(&inherited) {
            let mut triggers = Vec::new();
            for step in &steps.steps {
                let _ = step.run_env();
                if let Instruction::Onbuild(trigger) = &step.instruction {
                    triggers.push(trigger.clone());
                }
            }
            // Replay this stage's ONBUILD triggers as if its image were a base.
            let _ = stage.steps_with_triggers(&inherited, &triggers);
            finished.insert(stage.index, steps.env);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    if let Ok(ast) = parse_ast(&text) {
        let _ = ast.dump();
    }

    let env = vec![
        ("A".to_string(), "x y".to_string()),
        ("EMPTY".to_string(), String::new()),
        ("P".to_string(), "a/b/c.tar.gz".to_string()),
    ];
    for line in text.lines().take(32) {
        let _ = Lexer::new('\\').expand(line, &env);
        let _ = Lexer::new('`').split(line, &env);
    }

    if let Ok(dockerfile) = Dockerfile::parse(&text) {
        let mut options = PlanOptions::default();
        options.build_args.insert("A".to_string(), "1".to_string());
        options.build_args.insert("HTTP_PROXY".to_string(), "http://proxy:3128".to_string());
        plan_and_expand(&dockerfile, &options);
        for stage in dockerfile.stages().iter().take(8) {
            if let Some(name) = &stage.name {
                let options = PlanOptions {
                    target: Some(name.clone()),
                    ..PlanOptions::default()
                };
                plan_and_expand(&dockerfile, &options);
            }
        }
    }
});
