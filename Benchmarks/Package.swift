// swift-tools-version: 6.1
// Granary's benchmarks: a nested package so package-benchmark stays out of the library's
// dependency graph. Run from this directory: `swift package benchmark`.
import PackageDescription

let package = Package(
    name: "GranaryBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        // Named, so that the product reference below does not depend on the name of the
        // directory the repository was cloned into (a path dependency's identity is its last
        // path component: "main" in one checkout, "granary" in another).
        .package(name: "Granary", path: "../"),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.0", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "TransportBenchmarks",
            dependencies: [
                .product(name: "Granary", package: "Granary"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/TransportBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
