module agentrun.dev/build/jaeger

go 1.26.8
