// swift-tools-version: 6.1
// Granary: a FaRM-style distributed transactional memory engine.
//
// The target list reads as the architecture, bottom up:
//   C bindings      CPMem, CIBVerbs, CRDMACM, CZooKeeper
//   memory          GranaryMemory     regions (libpmem files), object layout, slab allocator
//   transport       GranaryTransport  one-sided ops + message channels; shared-memory backend
//                   GranaryVerbs      the RDMA verbs backend
//   coordination    GranaryCoordination   ZooKeeper's model: the protocol and the embedded store
//                   GranaryZooKeeper      the ZooKeeper backend (C client)
//   configuration   GranaryConfiguration  configuration ids, members, region placement
//   engine          GranaryEngine     FaRM's commit protocol: execute, lock, validate, commit, truncate
//   membership      GranaryMembership the configuration manager: election, leases, reconfiguration
//   library         Granary           the public umbrella module: Cluster, Node, Transaction
//   workloads       GranaryWorkloads  benchmark workloads and the harness behind `granary bench`
//   checking        GranaryCheck      histories (JSON Lines) and the strict-serializability checker behind `granary check`
//   command         granary           the `granary` tool
import PackageDescription

let package = Package(
    name: "Granary",
    products: [
        .library(name: "Granary", targets: ["Granary"]),
        .library(name: "GranaryCheck", targets: ["GranaryCheck"]),
        .executable(name: "granary", targets: ["GranaryCommand"]),
        .executable(name: "granary-verbs-latency", targets: ["GranaryVerbsLatency"]),
        .executable(name: "example-bank", targets: ["ExampleBank"]),
        .executable(name: "example-hashtable", targets: ["ExampleHashTable"]),
        .executable(name: "example-client", targets: ["ExampleClient"]),
        .executable(name: "example-verbs-read", targets: ["ExampleVerbsRead"]),
    ],
    // A service that uses only the shared-memory transport and the embedded coordination store
    // depends on Granary with `traits: []`: it then needs libpmem alone, not libibverbs,
    // librdmacm or the ZooKeeper C client. The command, tests and benchmarks use both.
    traits: [
        .trait(name: "RDMA", description: "The RDMA verbs transport (GranaryVerbs: libibverbs, librdmacm)."),
        .trait(name: "ZooKeeper", description: "The ZooKeeper coordination store (GranaryZooKeeper: the ZooKeeper C client)."),
        .default(enabledTraits: ["RDMA", "ZooKeeper"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.5.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.0.0"),
        // `swift package generate-documentation --target Granary` (Scripts/test stage docs).
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.0.0"),
    ],
    targets: [
        // MARK: C bindings (system libraries; Scripts/ installs the apt packages)
        .systemLibrary(
            name: "CPMem",
            pkgConfig: "libpmem",
            providers: [.apt(["libpmem-dev"])]
        ),
        .systemLibrary(
            name: "CIBVerbs",
            pkgConfig: "libibverbs",
            providers: [.apt(["libibverbs-dev", "ibverbs-providers"])]
        ),
        .systemLibrary(
            name: "CZooKeeper",
            providers: [.apt(["libzookeeper-mt-dev"])]
        ),
        .systemLibrary(
            name: "CRDMACM",
            pkgConfig: "librdmacm",
            providers: [.apt(["librdmacm-dev"])]
        ),

        // MARK: Memory
        .target(
            name: "GranaryMemory",
            dependencies: [
                "CPMem",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),

        // MARK: Transport
        .target(
            name: "GranaryTransport",
            dependencies: [
                "GranaryMemory",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),

        // MARK: Verbs transport (RDMA over libibverbs; soft-RoCE for testing)
        .target(
            name: "GranaryVerbs",
            dependencies: ["CIBVerbs", "CRDMACM", "GranaryMemory", "GranaryTransport"]
        ),
        .executableTarget(
            name: "GranaryVerbsLatency",
            dependencies: ["GranaryVerbs"]
        ),

        // MARK: Coordination (agreement on the configuration: embedded store, ZooKeeper)
        .target(
            name: "GranaryCoordination"
        ),
        .target(
            name: "GranaryZooKeeper",
            dependencies: ["CZooKeeper", "GranaryCoordination"]
        ),

        // MARK: Configuration
        .target(
            name: "GranaryConfiguration",
            dependencies: ["GranaryMemory"]
        ),

        // MARK: Transaction engine
        .target(
            name: "GranaryEngine",
            dependencies: [
                "GranaryMemory",
                "GranaryTransport",
                "GranaryConfiguration",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),

        // MARK: Membership: configuration manager, leases, reconfiguration
        .target(
            name: "GranaryMembership",
            dependencies: [
                "CPMem", "GranaryConfiguration", "GranaryCoordination", "GranaryEngine", "GranaryMemory", "GranaryTransport",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),

        // MARK: Public library
        .target(
            name: "Granary",
            dependencies: [
                "GranaryMemory",
                "GranaryTransport",
                "GranaryConfiguration",
                "GranaryEngine",
                "GranaryCoordination",
                .target(name: "GranaryZooKeeper", condition: .when(traits: ["ZooKeeper"])),
                "GranaryMembership",
                .target(name: "GranaryVerbs", condition: .when(traits: ["RDMA"])),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),

        // MARK: Workloads and the benchmark harness
        .target(
            name: "GranaryWorkloads",
            dependencies: [
                "Granary",
                "GranaryCheck",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),

        // MARK: History checker (Elle-like; Foundation only)
        .target(
            name: "GranaryCheck"
        ),

        // MARK: Command
        .executableTarget(
            name: "GranaryCommand",
            dependencies: [
                "Granary",
                "GranaryVerbs",
                "GranaryZooKeeper",
                "GranaryWorkloads",
                "GranaryCheck",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),

        // MARK: Examples
        .executableTarget(
            name: "ExampleHashTable",
            dependencies: ["Granary"]
        ),
        .executableTarget(
            name: "ExampleBank",
            dependencies: ["Granary"]
        ),
        .executableTarget(
            name: "ExampleClient",
            dependencies: ["Granary"]
        ),
        // One-sided RDMA verbs between two nodes on one device (runs where there is one: a
        // soft-RoCE guest, Scripts/softroce-vm).
        .executableTarget(
            name: "ExampleVerbsRead",
            dependencies: ["GranaryVerbs", "GranaryTransport", "GranaryMemory", .product(name: "SystemPackage", package: "swift-system")]
        ),

        // MARK: Tests
        .target(
            name: "GranaryTestSupport",
            dependencies: ["GranaryTransport", "GranaryCoordination", .product(name: "SystemPackage", package: "swift-system")],
            path: "Tests/GranaryTestSupport"
        ),
        .testTarget(
            name: "GranaryMemoryTests",
            dependencies: ["GranaryMemory", "GranaryTestSupport"]
        ),
        .testTarget(
            name: "GranaryTransportTests",
            dependencies: ["GranaryTransport", "GranaryTestSupport"]
        ),
        .testTarget(
            name: "GranaryCoordinationTests",
            dependencies: ["GranaryCoordination", "GranaryZooKeeper", "GranaryTestSupport"]
        ),
        .testTarget(
            name: "GranaryEngineTests",
            dependencies: ["Granary", "GranaryWorkloads", "GranaryCheck", "GranaryTestSupport", .product(name: "MetricsTestKit", package: "swift-metrics"),
                           .product(name: "ServiceLifecycle", package: "swift-service-lifecycle")]
        ),
        // The transport conformance suite over verbs (skipped, with the reason, without an RDMA device).
        .testTarget(
            name: "GranaryVerbsTests",
            dependencies: ["GranaryVerbs", "GranaryTestSupport"]
        ),
        .testTarget(
            name: "GranaryCheckTests",
            dependencies: ["GranaryCheck"]
        ),
        // Tests that start `granary` node processes (Scripts/test stage `multiprocess`).
        .testTarget(
            name: "GranaryMultiProcessTests",
            dependencies: ["Granary", "GranaryTestSupport", "GranaryCommand"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
