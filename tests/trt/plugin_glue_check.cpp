// Loads liblowrank_add_plugin_dynamic.so the way IPluginRegistry::loadLibrary does (dlopen + getCreators) and
// drives the IPluginV3 build-time interface on the CPU, without TensorRT's library: creator identity and fields,
// createPlugin, output types and shapes, format combinations, configurePlugin's shape checks, the workspace size,
// the serialized fields of the plugin and of a clone. Prints "key value" lines for tests/trt/test_plugin_glue.py.
// (enqueue needs a GPU: the gpu tests run it.)
#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <initializer_list>

#include "NvInfer.h"

using namespace nvinfer1;

namespace
{

DynamicPluginTensorDesc desc(DataType type, std::initializer_list<int64_t> dims)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    int32_t i = 0;
    for (int64_t v : dims)
    {
        d.desc.dims.d[i] = v;
        d.min.d[i] = v < 0 ? 1 : v;
        d.max.d[i] = v < 0 ? 256 : v; // dynamic token axis: up to 256 tokens
        ++i;
    }
    d.min.nbDims = d.max.nbDims = d.desc.dims.nbDims;
    return d;
}

int32_t serializedGroupSize(IPluginV3OneRuntime* runtime)
{
    PluginFieldCollection const* fc = runtime->getFieldsToSerialize();
    if (fc == nullptr || fc->nbFields != 1 || std::strcmp(fc->fields[0].name, "group_size") != 0)
    {
        return -1;
    }
    return *static_cast<int32_t const*>(fc->fields[0].data);
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s liblowrank_add_plugin_dynamic.so\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    std::printf("has_getCreators %d\n", getCreators != nullptr);
    std::printf("has_setLoggerFinder %d\n", dlsym(lib, "setLoggerFinder") != nullptr);
    if (getCreators == nullptr)
    {
        return 1;
    }
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    std::printf("creators %d\n", nbCreators);
    std::printf("creator_kind %s\n", creators[0]->getInterfaceInfo().kind);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    std::printf("identity %s/%s/%s\n", creator->getPluginName(), creator->getPluginVersion(),
        creator->getPluginNamespace());
    PluginFieldCollection const* names = creator->getFieldNames();
    std::printf("field_names %d %s\n", names->nbFields, names->fields[0].name);

    int32_t groupSize = 64;
    PluginField field("group_size", &groupSize, PluginFieldType::kINT32, 1);
    PluginFieldCollection fc{1, &field};
    IPluginV3* plugin = creator->createPlugin("lowrank", &fc, TensorRTPhase::kBUILD);
    int32_t badSize = 0;
    PluginField badField("group_size", &badSize, PluginFieldType::kINT32, 1);
    PluginFieldCollection badFc{1, &badField};
    std::printf("create_group0_null %d\n", creator->createPlugin("bad", &badFc, TensorRTPhase::kBUILD) == nullptr);

    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::printf("core_identity %s/%s/%s\n", core->getPluginName(), core->getPluginVersion(), core->getPluginNamespace());
    std::printf("outputs %d\n", build->getNbOutputs());

    DataType inTypes[4] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF};
    DataType outType = DataType::kFLOAT;
    std::printf("output_type_status %d\n", build->getOutputDataTypes(&outType, 1, inTypes, 4));
    std::printf("output_type_half %d\n", outType == DataType::kHALF);
    std::printf("output_type_3_inputs %d\n", build->getOutputDataTypes(&outType, 1, inTypes, 3));

    // Dense path: Y [tokens, 128], X [tokens, 64], R [8, 64], L [128, 8], output like Y.
    DynamicPluginTensorDesc dense[5] = {desc(DataType::kHALF, {-1, 128}), desc(DataType::kHALF, {-1, 64}),
        desc(DataType::kHALF, {8, 64}), desc(DataType::kHALF, {128, 8}), desc(DataType::kHALF, {-1, 128})};
    int32_t ok = 0;
    for (int32_t pos = 0; pos < 5; ++pos)
    {
        ok += build->supportsFormatCombination(pos, dense, 4, 1);
    }
    std::printf("dense_formats_ok %d\n", ok);
    dense[2].desc.type = DataType::kFLOAT;
    std::printf("dense_mixed_type %d\n", build->supportsFormatCombination(2, dense, 4, 1));
    dense[2].desc.type = DataType::kHALF;
    dense[1].desc.format = TensorFormat::kHWC8;
    std::printf("dense_non_linear %d\n", build->supportsFormatCombination(1, dense, 4, 1));
    dense[1].desc.format = TensorFormat::kLINEAR;
    std::printf("configure_dense %d\n", build->configurePlugin(dense, 4, dense + 4, 1));
    DynamicPluginTensorDesc wrongK[5] = {dense[0], dense[1], desc(DataType::kHALF, {8, 32}), dense[3], dense[4]};
    std::printf("configure_wrong_k %d\n", build->configurePlugin(wrongK, 4, wrongK + 4, 1));
    std::printf("workspace_dense %zu\n", build->getWorkspaceSize(dense, 4, dense + 4, 1));

    // Packed INT4 path with group size 64: Rq bytes ceil(8*64/2), Rs [8, 1], Lq ceil(128*8/2), Ls [128, 1].
    DynamicPluginTensorDesc packed[7] = {dense[0], dense[1], desc(DataType::kUINT8, {256}),
        desc(DataType::kHALF, {8, 1}), desc(DataType::kUINT8, {512}), desc(DataType::kHALF, {128, 1}), dense[4]};
    ok = 0;
    for (int32_t pos = 0; pos < 7; ++pos)
    {
        ok += build->supportsFormatCombination(pos, packed, 6, 1);
    }
    std::printf("int4_formats_ok %d\n", ok);
    std::printf("configure_int4 %d\n", build->configurePlugin(packed, 6, packed + 6, 1));
    packed[2] = desc(DataType::kUINT8, {255});
    std::printf("configure_int4_short_bytes %d\n", build->configurePlugin(packed, 6, packed + 6, 1));

    std::printf("serialized_group_size %d\n", serializedGroupSize(runtime));
    IPluginV3* copy = plugin->clone();
    delete plugin; // the clone's serialized fields must not point into the original
    std::printf("clone_group_size %d\n",
        serializedGroupSize(static_cast<IPluginV3OneRuntime*>(copy->getCapabilityInterface(PluginCapabilityType::kRUNTIME))));
    delete copy;
    return 0;
}
